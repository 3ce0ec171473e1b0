"""The trainer's configuration: the Hydra groups `optim` (recipes/optim/*.yaml) and `train` (recipes/train/*.yaml).

Each group maps onto one dataclass, validated on construction; an unknown key or a value that cannot work fails
with the field named and the fix (as `model.ModelConfig` does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from latentforge.model.errors import UserError
from latentforge.model.schema import from_dict

SCHEDULES = ("wsd", "cosine", "constant")


class TrainConfigError(UserError, ValueError):
    """A trainer setting that cannot work; the message names the field and the fix."""


def _from_dict(cls, values: dict, group: str):
    return from_dict(cls, values, group, TrainConfigError)


def _need(ok: bool, message: str):
    if not ok:
        raise TrainConfigError(message)


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule (SPEC section 6 gives the real run's values)."""

    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-5  # where the decay ends (wsd, cosine)
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # never applied to norms, biases, A_log, D, dt_bias (see train/optim.py)
    grad_clip: float = 1.0  # global L2 norm; <= 0 disables clipping (the norm is still measured)
    schedule: str = "wsd"  # wsd (warmup-stable-decay, `1 - sqrt` decay), cosine, constant
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # wsd: share of all steps spent in the final decay
    decay_steps: Optional[int] = None  # wsd: overrides decay_fraction when set
    foreach: Optional[bool] = None  # torch's multi-tensor AdamW; None lets torch choose

    def __post_init__(self):
        self.betas = tuple(self.betas)
        self.validate()

    def validate(self):
        _need(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _need(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        _need(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {self.betas}",
        )
        _need(self.eps > 0, f"optim.eps must be positive, got {self.eps}")
        _need(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _need(self.schedule in SCHEDULES, f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _need(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _need(0 <= self.decay_fraction <= 1, f"optim.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        _need(
            self.decay_steps is None or self.decay_steps >= 0,
            f"optim.decay_steps must be >= 0 or null, got {self.decay_steps}",
        )

    @classmethod
    def from_dict(cls, values: dict) -> "OptimConfig":
        return _from_dict(cls, values, "optim")


@dataclass
class WandbConfig:
    enabled: bool = True  # W&B on the metrics rank; WANDB_MODE=disabled turns it off too
    project: str = "latentforge"
    entity: Optional[str] = None
    # online / offline / disabled; null: $WANDB_MODE, else online when credentials exist, else offline
    mode: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    """How long, how big, how often: everything about the loop that is not the model, layout or data."""

    run_name: str = "run"
    run_dir: Optional[str] = None  # null: runs/<run_name>; an existing run directory with checkpoints resumes
    steps: int = 100  # optimizer steps of the whole run (the LR schedule spans them)
    stop_at_step: Optional[int] = None  # end this launch early (checkpoint saved); the schedule still spans `steps`
    seq_len: int = 256
    micro_batch_size: int = 4  # sequences per forward/backward on one data-parallel rank
    global_batch_size: int = 8  # sequences per optimizer step over all data-parallel ranks
    # lengths that change per step at the token budget global_batch_size x seq_len (train/seq_schedule.py):
    # [1048576, 4096] alternates the two every step; [{seq_len: 4096, steps: 100}, {seq_len: 65536, steps: 50}]
    # runs phases, cycling; [] is train.seq_len on every step
    seq_len_schedule: List[Any] = field(default_factory=list)
    seed: int = 0

    log_interval: int = 1  # console line / JSONL / W&B every this many steps
    checkpoint_interval: int = 100  # DCP save every this many steps (and always at the end and on SIGTERM)
    keep_last: int = 2  # complete checkpoints kept; older ones are deleted after a newer one is complete
    async_checkpoint: bool = False  # write checkpoints in a background thread while training goes on
    resume: bool = True  # continue from the newest intact checkpoint in the run directory, if there is one
    # a damaged newest checkpoint stops the launch instead of falling back (with a warning) to an older intact one
    strict_resume: bool = False
    # with resume=false: move an existing run's checkpoints and metrics aside (<run_dir>/old-<time>/) and start over;
    # without it, resume=false on a run directory holding checkpoints is an error
    overwrite: bool = False
    export_hf: bool = False  # at the end, write a Hugging Face export of the final checkpoint to <run_dir>/hf
    # lm-evaluation-harness tasks scored during training (log-likelihood ones: multiple choice, perplexity), every
    # eval_interval steps and at the end; logged as eval/<task>/<metric> (train/callbacks/eval_tasks.py)
    eval_tasks: List[str] = field(default_factory=list)
    eval_interval: int = 100
    eval_limit: Optional[int] = None  # documents per task (null: all)
    eval_include: List[str] = field(default_factory=list)  # folders of extra task YAML files

    max_consecutive_nonfinite: int = 5  # non-finite losses in a row that stop the run (each one skips its step)
    progress_bar: bool = True  # a tqdm bar, only when stdout is a terminal
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        if isinstance(self.wandb, dict):
            self.wandb = _from_dict(WandbConfig, self.wandb, "train.wandb")
        self.validate()

    def validate(self):
        for name in (
            "steps",
            "seq_len",
            "micro_batch_size",
            "global_batch_size",
            "log_interval",
            "checkpoint_interval",
            "keep_last",
            "max_consecutive_nonfinite",
            "eval_interval",
        ):
            _need(getattr(self, name) > 0, f"train.{name} must be positive, got {getattr(self, name)}")
        _need(
            self.global_batch_size % self.micro_batch_size == 0,
            f"train.global_batch_size ({self.global_batch_size}) must be a multiple of train.micro_batch_size "
            f"({self.micro_batch_size})",
        )
        _need(
            self.eval_limit is None or self.eval_limit > 0,
            f"train.eval_limit must be positive or null (every document), got {self.eval_limit}",
        )
        _need(
            not self.eval_tasks or self.eval_interval % self.log_interval == 0,
            f"train.eval_interval ({self.eval_interval}) must be a multiple of train.log_interval "
            f"({self.log_interval}), or the steps that evaluate are not logged",
        )
        _need(
            self.stop_at_step is None or 0 < self.stop_at_step <= self.steps,
            f"train.stop_at_step must be in (0, train.steps={self.steps}] or null, got {self.stop_at_step}",
        )
        if self.seq_len_schedule:  # a bad schedule fails here, when the recipe loads, not when its phase comes
            from .seq_schedule import SeqLenSchedule

            SeqLenSchedule.of(self)

    def grad_accumulation(self, dp_size: int) -> int:
        """Micro-batches per optimizer step on each data-parallel rank; the sizes must divide exactly."""
        per_step = self.micro_batch_size * dp_size
        if self.global_batch_size % per_step:
            raise TrainConfigError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({self.micro_batch_size}) x data-parallel size ({dp_size}) = {per_step}; change one of them"
            )
        return self.global_batch_size // per_step

    @property
    def last_step(self) -> int:
        """The step this launch ends at."""
        return self.stop_at_step or self.steps

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return _from_dict(cls, values, "train")
