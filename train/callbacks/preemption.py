"""SIGTERM (Slurm sends it before the time limit; torchrun forwards it) -> checkpoint now and exit cleanly.

The handler only sets a flag; after each step every rank learns whether any rank got the signal (one tiny
all-reduce), so all of them stop at the same step and save together.
"""

from __future__ import annotations

import signal

from .. import distributed as world
from .base import Callback


class PreemptionHandler(Callback):
    order = 90
    essential = True  # its all-reduce must run on every rank

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.received = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def on_train_start(self, trainer) -> None:
        for sig in self.signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test harness): no handler, no preemption
                pass

    def on_step_end(self, trainer, metrics: dict) -> None:
        if world.any_rank(self.received is not None):
            trainer.request_stop(f"signal {self.received or 'received by another rank'}")

    def on_train_end(self, trainer, reason: str) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
