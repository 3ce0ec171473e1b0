"""Learning-rate schedules, as pure functions of the step: resuming needs nothing but the step number.

`lr_at(step)` is the rate used by the optimizer update that takes the model from `step` to `step + 1`.
- wsd: linear warmup from 0, then the peak, then over the last `decay` steps `1 - sqrt` down to min_lr
  (SPEC section 6: lr = min + (peak - min) * (1 - sqrt(progress)), progress 0 -> 1 across the decay).
- cosine: linear warmup, then half a cosine from the peak to min_lr at the last step.
- constant: linear warmup, then the peak.
"""

from __future__ import annotations

import math

from .config import OptimConfig


class LRSchedule:
    def __init__(self, cfg: OptimConfig, total_steps: int):
        self.cfg = cfg
        self.total_steps = total_steps
        self.warmup = min(cfg.warmup_steps, total_steps)
        if cfg.schedule == "wsd":
            decay = cfg.decay_steps if cfg.decay_steps is not None else round(cfg.decay_fraction * total_steps)
            self.decay = min(decay, total_steps - self.warmup)
        else:
            self.decay = total_steps - self.warmup

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < self.warmup:
            return cfg.lr * (step + 1) / self.warmup
        if cfg.schedule == "constant" or self.decay <= 0:
            return cfg.lr
        decay_start = self.total_steps - self.decay
        if step < decay_start:  # wsd's stable phase
            return cfg.lr
        # progress reaches 1 at the last step, so the final update uses min_lr
        progress = min(1.0, (step - decay_start + 1) / self.decay)
        if cfg.schedule == "wsd":
            shape = 1.0 - math.sqrt(progress)
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape

    def state_dict(self) -> dict:
        # the rate is a function of the step: this is recorded so a resume with another schedule is noticed
        return {
            "schedule": self.cfg.schedule,
            "lr": self.cfg.lr,
            "min_lr": self.cfg.min_lr,
            "warmup": self.warmup,
            "decay": self.decay,
            "total_steps": self.total_steps,
        }
