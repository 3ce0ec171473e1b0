"""Scoring one completion: the task's verifier plus any user reward functions, every failure contained.

total = task_weight * task_score + sum_i weight_i * fn_i(record, completion)  (+ the judge's, rl/actors/reward.py)

For an environment episode the environment's reward is the task score and `completion` is the episode's text after
the prompt (every assistant turn and the rendered observations).

A component that raises, hangs (isolated functions only), crashes its sandbox or returns NaN / inf / a non-number
contributes 0 and is reported in `info["failures"]` (status error | timeout | crash | non_finite); the caller
counts them (the `reward_failures` metric) and logs the reason. The total is always finite: nothing a reward
function does reaches the loss as NaN, or stops the loop.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

from .base import NonFiniteRewardError, RewardResult, as_result, get_task
from .sandbox import IsolatedFunction, load_target

ISOLATIONS = ("process", "inline")
log = logging.getLogger(__name__)


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
            raise ValueError(
                f"reward function {self.target}: isolation must be one of {ISOLATIONS}, got {self.isolation!r}"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"reward function {self.target}: timeout_s must be positive, got {self.timeout_s}")
        self.name = self.name or self.target.rpartition(":")[2]


class RewardScorer:
    def __init__(self, functions: Sequence[Union[RewardFunctionConfig, dict]] = (), task_weight: float = 1.0):
        self.task_weight = task_weight
        self.configs = [f if isinstance(f, RewardFunctionConfig) else RewardFunctionConfig(**f) for f in functions]
        self._callables = []
        for cfg in self.configs:
            if cfg.isolation == "process":
                self._callables.append(
                    IsolatedFunction(cfg.target, timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb).start()
                )
            else:
                self._callables.append(load_target(cfg.target))
        self._tasks = {}
        self.failures = 0
        self._warned_non_finite = set()  # functions whose non-finite reward was logged (once each: no log flood)

    def _task(self, name: str):
        if name not in self._tasks:
            self._tasks[name] = get_task(name)
        return self._tasks[name]

    def score(self, record: dict, completion: str, verdict: Optional[RewardResult] = None) -> RewardResult:
        """`verdict`: the score an environment already gave this completion (a multi-turn episode's summed step
        rewards); it takes the task verifier's place, weighted by task_weight, as component "env"."""
        start = time.perf_counter()
        failures, components = [], {}
        total, correct, info = 0.0, None, {}
        try:
            result = verdict if verdict is not None else as_result(self._task(record["task"]).score(record, completion))
        except Exception as exc:  # noqa: BLE001 - a verifier bug must not stop the loop: 0 and reported
            failures.append(_failure(f"task:{record.get('task')}", exc, traceback.format_exc(limit=3)))
        else:
            total += self.task_weight * result.score
            correct = result.correct
            components["task" if verdict is None else "env"] = result.score
            info = dict(result.info)
        for cfg, fn in zip(self.configs, self._callables):
            status, value = self._call(cfg, fn, record, completion)
            if status == "ok":
                try:
                    part = as_result(value)
                except (TypeError, ValueError) as exc:
                    failures.append(_failure(cfg.name or cfg.target, exc, str(exc)))  # name is set in __post_init__
                else:
                    total += cfg.weight * part.score
                    components[cfg.name] = part.score
            else:
                failures.append({"function": cfg.name, "status": status, "message": str(value)[-2000:]})
        if not math.isfinite(total):  # finite parts times weights can still overflow
            failures.append(
                {
                    "function": "total",
                    "status": "non_finite",
                    "message": f"the weighted sum {total} is not finite (components {components})",
                }
            )
            total = 0.0
        self.failures += len(failures)
        for failure in failures:
            if failure["status"] == "non_finite" and failure["function"] not in self._warned_non_finite:
                self._warned_non_finite.add(failure["function"])
                log.warning(
                    "reward %s is not finite, scored 0 (logged once; every one is counted in reward_failures): %s",
                    failure["function"],
                    failure["message"].strip().splitlines()[-1],
                )
        info.update(components=components, reward_s=time.perf_counter() - start)
        if failures:
            info["failures"] = info.get("failures", []) + failures  # after the environment's own, if any
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


def _failure(function: str, exc: Exception, message: str) -> dict:
    status = "non_finite" if isinstance(exc, NonFiniteRewardError) else "error"
    return {"function": function, "status": status, "message": message[-2000:]}
