"""Trainer callbacks (OLMo-core style): everything around the loop that is not the step itself.

Metric producers run first (speed/MFU, memory), then writers (console, JSONL, W&B, progress bar), then control
(SIGTERM). Every rank runs every callback; writers act only on the metrics rank.
"""

from .base import Callback
from .console import ConsoleLogger
from .jsonl import JSONLWriter
from .preemption import PreemptionHandler
from .progress import ProgressBar
from .speed import FlopsPerToken, SpeedMonitor
from .wandb_logger import WandbLogger

__all__ = [
    "Callback",
    "ConsoleLogger",
    "JSONLWriter",
    "PreemptionHandler",
    "ProgressBar",
    "SpeedMonitor",
    "WandbLogger",
    "standard_callbacks",
]


def standard_callbacks(
    train_cfg,
    flops_per_token: FlopsPerToken,
    run_dir: str,
    device,
    world_size: int,
    config: dict,
    extra=(),
    tokenizer=None,
) -> list:
    """The callbacks of every training entry point (pretrain, SFT): speed/MFU, console, metrics.jsonl, W&B,
    SIGTERM handling, then `extra` (e.g. SFT validation), lm-eval tasks (train.eval_tasks, needs `tokenizer`),
    then the progress bar when asked for."""
    import os

    log_every = train_cfg.log_interval
    if train_cfg.eval_tasks:
        from .eval_tasks import EvalTasks

        if tokenizer is None:
            raise ValueError("train.eval_tasks needs the tokenizer: pass tokenizer= to standard_callbacks")
        extra = [
            *extra,
            EvalTasks(
                train_cfg.eval_tasks,
                train_cfg.eval_interval,
                tokenizer,
                train_cfg.seq_len,
                train_cfg.micro_batch_size,
                train_cfg.eval_limit,
                train_cfg.eval_include,
            ),
        ]
    callbacks = [
        SpeedMonitor(flops_per_token, device, world_size),
        ConsoleLogger(log_every),
        JSONLWriter(os.path.join(run_dir, "metrics.jsonl"), log_every),
        WandbLogger(train_cfg.wandb, train_cfg.run_name, run_dir, config, log_every),
        PreemptionHandler(),
        *extra,
    ]
    if train_cfg.progress_bar:
        callbacks.append(ProgressBar())
    return callbacks
