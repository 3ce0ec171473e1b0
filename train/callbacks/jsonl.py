"""Each logged step's metrics as one JSON object per line in <run_dir>/metrics.jsonl (appended across resumes)."""

from __future__ import annotations

import json
import math
import os
import time

from .base import Callback


def _plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class JSONLWriter(Callback):
    order = 60

    def __init__(self, path: str, log_interval: int = 1):
        self.path = path
        self.log_interval = log_interval
        self._file = None

    def on_train_start(self, trainer) -> None:
        if trainer.is_metrics_rank:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            # a resumed run appends after the records it continues; a run starting at step 0 starts the file over.
            # Line-buffered: a kill loses at most the line being written.
            self._file = open(self.path, "a" if trainer.state.step > 0 else "w", buffering=1)

    def on_step_end(self, trainer, metrics: dict) -> None:
        if self._file is None:
            return
        step = metrics["step"]
        if step % self.log_interval and step != trainer.last_step and not metrics.get("skipped"):
            return
        record = {"time": time.time(), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")

    def on_train_end(self, trainer, reason: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
