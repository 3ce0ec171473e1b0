"""GRPO metrics out: one console line, one JSON line (<run_dir>/metrics.jsonl, appended across resumes), and W&B
(offline unless credentials exist; $WANDB_MODE=disabled in tests). The W&B run id travels in the checkpoint."""

from __future__ import annotations

import collections
import json
import math
import os
import secrets
import time
from typing import List, Optional

from latentforge.train.callbacks.jsonl import keep_records_up_to
from latentforge.train.config import WandbConfig

CONSOLE_KEYS = (
    ("reward", "reward_mean", "{:.3f}"),
    ("acc", "accuracy", "{:.3f}"),
    ("len", "response_len", "{:.0f}"),
    ("turns", "turns", "{:.2f}"),
    ("tool_err", "tool_error_rate", "{:.2f}"),
    ("stale", "staleness_mean", "{:.2f}"),
    ("clip", "ppo_clip_frac", "{:.3f}"),
    ("tis", "tis_weight_mean", "{:.3f}"),
    ("mism0", "mismatch_fresh_mean", "{:.1e}"),
    ("mtp_acc_len", "mtp_accepted_length", "{:.2f}"),
    ("draft_on", "draft_on", "{:.2f}"),
    ("draft_x", "draft_expected_speedup", "{:.2f}"),
    ("gen_tok/s", "rollout_tokens_per_s", "{:.0f}"),
    ("train_tok/s", "train_tokens_per_s", "{:.0f}"),
    ("sync", "sync_s", "{:.3f}s"),
    ("sync_share", "sync_share", "{:.1%}"),
    ("stall", "stall_per_update_s", "{:.4f}s"),
    ("idle_T", "trainer_idle_frac", "{:.2f}"),
    ("idle_R", "rollout_idle_frac", "{:.2f}"),
)


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def console_line(m: dict, total_steps: int) -> str:
    parts = [f"step {m['step']}/{total_steps}"]
    for label, key, fmt in CONSOLE_KEYS:
        value = m.get(key)
        if value is not None:
            parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts) + f" | {m.get('wall_s', 0.0):.1f}s"


class MetricsLogger:
    def __init__(
        self,
        run_dir: str,
        run_name: str,
        wandb_cfg: WandbConfig,
        config: dict,
        total_steps: int,
        log_interval: int = 1,
        print_fn=print,
    ):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(self.path, "a", buffering=1)
        self.total_steps = total_steps
        self.log_interval = log_interval
        self.print = print_fn
        self.wandb_cfg = wandb_cfg
        self.run_name, self.run_dir, self.config = run_name, run_dir, config
        self.run_id: Optional[str] = None
        self._run = None

    def start(self, run_id: Optional[str] = None) -> str:
        from latentforge.train.callbacks.wandb_logger import resolve_mode

        self.run_id = run_id or secrets.token_hex(4)
        mode = resolve_mode(self.wandb_cfg.mode) if self.wandb_cfg.enabled else "disabled"
        if mode != "disabled":
            import wandb

            self._run = wandb.init(
                project=self.wandb_cfg.project,
                entity=self.wandb_cfg.entity,
                name=self.run_name,
                id=self.run_id,
                resume="allow",
                dir=self.run_dir,
                mode=mode,
                config=self.config,
                tags=self.wandb_cfg.tags or None,
            )
        return self.run_id

    def rewind(self, step: int) -> None:
        """Drop the records past `step` (steps the loop trains again after a resume or a trainer restart) and any
        line cut short by a kill, so metrics.jsonl holds each step once: the run that the weights went through."""
        self.file.close()
        keep_records_up_to(self.path, step)
        self.file = open(self.path, "a", buffering=1)

    def log(self, metrics: dict, console: bool = True) -> None:
        record = {"time": time.time(), **{str(k): _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        step = metrics.get("step", 0)
        if console and (step % self.log_interval == 0 or step == self.total_steps):
            self.print(console_line(metrics, self.total_steps))
        if self._run is not None:
            flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for name, count in (metrics.get("staleness_hist") or {}).items():
                flat[f"staleness_hist/{name}"] = count
            self._run.log(flat, step=step)

    def close(self) -> None:
        self.file.close()
        if self._run is not None:
            self._run.finish()
            self._run = None


def draft_gate_metrics(rollout_now: list) -> dict:
    """Under rl.rollout.draft_gate: the share of rollout workers drafting at their last step and their mean
    expected drafting speedup (empty without the gate)."""
    gated = [s for s in rollout_now if s.get("draft_on") is not None]
    if not gated:
        return {}
    estimates = [s["expected_draft_speedup"] for s in gated if s.get("expected_draft_speedup") is not None]
    return {
        "draft_on": sum(bool(s["draft_on"]) for s in gated) / len(gated),
        "draft_expected_speedup": sum(estimates) / len(estimates) if estimates else None,
    }


def sync_share(push_wall_s: float, step_wall_s: float) -> Optional[float]:
    """The weight push's share of the step's wall time (None before a step has a duration)."""
    return push_wall_s / step_wall_s if step_wall_s > 0 else None


def step_metrics(
    version: int,
    groups: List,
    train: dict,
    push: dict,
    rollout_now: list,
    rollout_before: list,
    *,
    normalize_std: bool,
    waited: float,
    wall: float,
    previous_wall: float,
    trainer_wait: float,
    counters: dict,
    filtered: list,
) -> dict:
    """Everything logged for the step that trained weights `version`: from the trained groups (rewards, advantages,
    staleness per token), the trainer's summed statistics, the push, and the rollout workers' counters (differences
    since the previous step)."""
    import torch

    from latentforge.rl.losses import group_advantages

    samples = [s for g in groups for s in g.samples]
    rewards = [s.reward for s in samples]
    judged = [s.reward_info.get("correct") for s in samples if s.reward_info.get("correct") is not None]
    adv = group_advantages(torch.tensor([g.rewards for g in groups], dtype=torch.float64), normalize_std)
    hist = collections.Counter(version - v for s in samples for v in s.versions if v >= 0)
    tokens = max(train.get("tokens", 0.0), 1.0)

    def delta(key):
        return sum(s[key] for s in rollout_now) - sum(s[key] for s in rollout_before)

    busy, idle, stall, updates = delta("busy_s"), delta("idle_s"), delta("stall_s"), delta("updates")
    rows, verified = delta("verify_rows"), delta("verify_tokens")
    elapsed = wall - previous_wall
    fresh = train.get("fresh_tokens")
    return {
        "step": version + train.get("optimizer_steps", 1),
        "version": version,
        "wall_s": wall,
        "reward_mean": sum(rewards) / len(rewards),
        "reward_std": float(torch.tensor(rewards).std()) if len(rewards) > 1 else 0.0,
        "accuracy": sum(map(bool, judged)) / len(judged) if judged else None,
        "adv_abs_mean": float(adv.abs().mean()),
        "adv_max": float(adv.max()),
        "adv_min": float(adv.min()),
        "response_len": sum(len(s.completion_ids) for s in samples) / len(samples),
        "overlong_frac": sum(s.truncated for s in samples) / len(samples),
        "staleness_hist": {str(k): v for k, v in sorted(hist.items())},
        "staleness_mean": train.get("staleness_sum", 0.0) / tokens,
        "staleness_max": max(hist) if hist else 0,
        "ppo_clip_frac": train.get("ppo_clipped", 0.0) / tokens,
        "tis_weight_mean": train.get("tis_weight_sum", 0.0) / tokens,
        "tis_truncated_frac": train.get("tis_truncated", 0.0) / tokens,
        "tis_weight_max": train.get("tis_weight_max"),
        "ratio_mean": train.get("ratio_sum", 0.0) / tokens,
        "mismatch_mean": train.get("abs_log_mismatch_sum", 0.0) / tokens,
        "mismatch_fresh_mean": train["mismatch_fresh_sum"] / fresh if fresh else None,
        "mismatch_fresh_max": train.get("mismatch_fresh_max") if fresh else None,
        "policy_loss": train.get("policy_loss"),
        "mtp_loss": train.get("mtp_loss_sum"),
        "aux_loss": train.get("aux_loss_sum"),
        "grad_norm": train["grad_norm"],
        "lr": train["lr"],
        "optimizer_steps": train.get("optimizer_steps", 1),
        "skipped_steps": train.get("skipped_steps", 0),
        "router_agreement": (train["router_agree_sum"] / train["router_pairs"] if train.get("router_pairs") else None),
        "train_s": train["train_s"],
        "train_tokens_per_s": train["train_tokens_per_s"],
        "sync_s": push["sync_s"],
        "push_wall_s": push["push_wall_s"],
        # the weight push as a share of this step's wall time (the goal: at most 2%)
        "sync_share": sync_share(push["push_wall_s"], elapsed),
        "stall_per_update_s": stall / updates if updates else 0.0,
        "rollout_tokens_per_s": delta("generated_tokens") / elapsed if elapsed > 0 else 0.0,
        "rollout_idle_frac": idle / (busy + idle + stall) if busy + idle + stall > 0 else 0.0,
        "trainer_wait_s": waited,
        "trainer_idle_frac": trainer_wait / wall if wall > 0 else 0.0,
        "mtp_accepted_length": verified / rows if rows else None,
        **draft_gate_metrics(rollout_now),
        "groups_zero_advantage": counters["groups_zero_advantage"],
        "groups_stale_dropped": counters["groups_stale_dropped"],
        "samples_overlong": counters["samples_overlong"],
        "reward_failures": counters["reward_failures"],
        "trained_groups": [g.group_id for g in groups],
        "filtered_groups": list(filtered),
    }
