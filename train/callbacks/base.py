"""The callback protocol the trainer drives."""

from __future__ import annotations


class Callback:
    """Override what you need. `order`: lower runs first (producers < writers < control).

    `metrics` is the step's dict (step, loss, lm_loss, mtp_losses, aux_loss, grad_norm, lr, tokens, step_time,
    skipped, moe_imbalance, ...); producers add to it, writers read it. `trainer.is_metrics_rank` says whether this
    rank is the one that writes.
    """

    order = 50
    # False (writers, monitors): an exception is logged and the callback is switched off; training and checkpoints
    # go on. True for callbacks that take part in collectives or control the run (all ranks must fail together).
    essential = False

    def on_train_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, metrics: dict) -> None:
        pass

    def on_checkpoint(self, trainer, path: str) -> None:
        pass

    def on_train_end(self, trainer, reason: str) -> None:
        pass

    # saved in the checkpoint under the trainer state (e.g. the W&B run id) -- must be the same on every rank
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
