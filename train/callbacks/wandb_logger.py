"""Weights & Biases on the metrics rank; the run id lives in the checkpoint, so a resume continues the same run.

Mode: $WANDB_MODE when set (tests set `disabled`), else `train.wandb.mode`, else online when credentials exist
($WANDB_API_KEY or a netrc entry for the W&B host) and offline otherwise (sync later with `wandb sync`).
"""

from __future__ import annotations

import netrc
import os
import secrets
from typing import Literal, Optional, cast

from .. import distributed as world
from .base import Callback

MODES = ("online", "offline", "disabled")
Mode = Literal["online", "offline", "disabled"]


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc().hosts
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_mode(configured: Optional[str]) -> Mode:
    mode = os.environ.get("WANDB_MODE") or configured
    if mode is None:
        return "online" if has_wandb_credentials() else "offline"
    if mode == "dryrun":  # W&B's old name for offline
        mode = "offline"
    if mode not in MODES:
        raise ValueError(f"W&B mode {mode!r} (from $WANDB_MODE or train.wandb.mode) must be one of {MODES}")
    return cast(Mode, mode)


class WandbLogger(Callback):
    order = 60

    def __init__(self, cfg, run_name: str, run_dir: str, config: dict, log_interval: int = 1):
        self.cfg = cfg
        self.run_name = run_name
        self.run_dir = run_dir
        self.config = config
        self.log_interval = log_interval
        self.run_id: Optional[str] = None  # restored from the checkpoint on resume
        self.mode: Mode = resolve_mode(cfg.mode) if cfg.enabled else "disabled"
        self._run = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id") or self.run_id

    def on_train_start(self, trainer) -> None:
        if self.run_id is None:  # a new run: every rank records the same id (it is saved by all of them)
            self.run_id = world.broadcast_object(secrets.token_hex(4) if world.rank() == 0 else None)
        if self.mode == "disabled" or not trainer.is_metrics_rank:
            return
        import wandb

        os.makedirs(self.run_dir, exist_ok=True)
        self._run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.run_name,
            id=self.run_id,
            resume="allow",
            dir=self.run_dir,
            mode=self.mode,
            config=self.config,
            tags=list(self.cfg.tags),
        )

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self._run is None:
            return
        step = metrics["step"]
        if step % self.log_interval and step != trainer.last_step:
            return
        flat = {}
        for key, value in metrics.items():
            if key == "mtp_losses":
                flat.update({f"train/mtp_loss_{i + 1}": v for i, v in enumerate(value)})
            elif isinstance(value, (int, float)):
                flat[f"train/{key}"] = value
        self._run.log(flat, step=step)

    def on_train_end(self, trainer, reason: str) -> None:
        if self._run is not None:
            self._run.summary["end_reason"] = reason
            self._run.finish()
            self._run = None
