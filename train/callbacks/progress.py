"""A tqdm progress bar on the metrics rank, only when stdout is a terminal (logs stay plain lines)."""

from __future__ import annotations

import sys

from .base import Callback


class ProgressBar(Callback):
    order = 70

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self._bar = None

    def on_train_start(self, trainer) -> None:
        if not trainer.is_metrics_rank or not self.stream.isatty():
            return
        from tqdm import tqdm

        self._bar = tqdm(
            total=trainer.last_step, initial=trainer.state.step, dynamic_ncols=True, leave=False, file=self.stream
        )
        trainer.print_hook = self._bar.write  # console lines go above the bar instead of through it

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self._bar is not None:
            self._bar.update(metrics["step"] - self._bar.n)
            self._bar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)

    def on_train_end(self, trainer, reason: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            trainer.print_hook = None
