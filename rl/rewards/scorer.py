"""Scoring one completion: the task's verifier plus any user reward functions, every failure contained.

total = task_weight * task_score + sum_i weight_i * fn_i(record, completion)

A component that raises, hangs (isolated functions only) or crashes its sandbox contributes 0 and is reported in
`info["failures"]`; the caller counts them. Nothing a reward function does can stop the loop.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import List, Optional

from .base import RewardResult, as_result, get_task
from .sandbox import IsolatedFunction, load_target

ISOLATIONS = ("process", "inline")


@dataclass
class RewardFunctionConfig:
    target: str  # "package.module:function", called as fn(record, completion)
    weight: float = 1.0
    isolation: str = "process"  # process: a sandbox child with limits (hangs and crashes contained); inline: trusted
    timeout_s: float = 5.0
    memory_mb: int = 2048
    name: Optional[str] = None

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"reward function {self.target}: isolation must be one of {ISOLATIONS}, "
                             f"got {self.isolation!r}")
        if self.timeout_s <= 0:
            raise ValueError(f"reward function {self.target}: timeout_s must be positive, got {self.timeout_s}")
        self.name = self.name or self.target.rpartition(":")[2]


class RewardScorer:
    def __init__(self, functions: List[RewardFunctionConfig] = (), task_weight: float = 1.0):
        self.task_weight = task_weight
        self.configs = [f if isinstance(f, RewardFunctionConfig) else RewardFunctionConfig(**f) for f in functions]
        self._callables = []
        for cfg in self.configs:
            if cfg.isolation == "process":
                self._callables.append(IsolatedFunction(cfg.target, timeout_s=cfg.timeout_s,
                                                        memory_mb=cfg.memory_mb).start())
            else:
                self._callables.append(load_target(cfg.target))
        self._tasks = {}
        self.failures = 0

    def _task(self, name: str):
        if name not in self._tasks:
            self._tasks[name] = get_task(name)
        return self._tasks[name]

    def score(self, record: dict, completion: str) -> RewardResult:
        start = time.perf_counter()
        failures, components = [], {}
        total, correct = 0.0, None
        try:
            result = self._task(record["task"]).score(record, completion)
            total += self.task_weight * result.score
            correct = result.correct
            components["task"] = result.score
            info = dict(result.info)
        except Exception:  # noqa: BLE001 - a verifier bug must not stop the loop: 0 and reported
            failures.append({"function": f"task:{record.get('task')}", "status": "error",
                             "message": traceback.format_exc(limit=3)})
            info = {}
        for cfg, fn in zip(self.configs, self._callables):
            status, value = self._call(cfg, fn, record, completion)
            if status == "ok":
                try:
                    part = as_result(value)
                except (TypeError, ValueError) as exc:
                    status, value = "error", str(exc)
                else:
                    total += cfg.weight * part.score
                    components[cfg.name] = part.score
            if status != "ok":
                failures.append({"function": cfg.name, "status": status, "message": str(value)[-2000:]})
        self.failures += len(failures)
        info.update(components=components, reward_s=time.perf_counter() - start)
        if failures:
            info["failures"] = failures
        return RewardResult(total, correct=correct, info=info)

    @staticmethod
    def _call(cfg: RewardFunctionConfig, fn, record, completion):
        if cfg.isolation == "process":
            return fn.call(record, completion)
        try:
            return "ok", fn(record, completion)
        except Exception:  # noqa: BLE001 - reported, scored 0
            return "error", traceback.format_exc(limit=3)

    def score_many(self, items) -> List[RewardResult]:
        """[(record, completion)] -> results, in order."""
        return [self.score(record, completion) for record, completion in items]

    def close(self) -> None:
        for fn in self._callables:
            if isinstance(fn, IsolatedFunction):
                fn.close()
