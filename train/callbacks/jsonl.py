"""Each logged step's metrics as one JSON object per line in <run_dir>/metrics.jsonl (appended across resumes).

A resumed run first drops the records past the step it resumes from (steps that will be trained again) and any
line cut short by a kill, so the file holds each step once, in order.
"""

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
            if trainer.state.step > 0:
                keep_records_up_to(self.path, trainer.state.step)
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


def keep_records_up_to(path: str, step: int) -> None:
    """Rewrite `path` (atomically) without records past `step` and without broken lines."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".partial", "w") as f:
        f.writelines(kept)
    os.replace(path + ".partial", path)


def read_jsonl(path: str) -> list:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
