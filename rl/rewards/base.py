"""The reward plug-in interface.

A task owns its prompts and its verifier; a reward function is anything callable as

    fn(record: dict, completion: str) -> float | RewardResult

where `record` is the prompt record (the task's fields: question, answer, numbers...) and `completion` the decoded
text the model produced after the generation prompt. Register a task with `register_task`, or list extra reward
functions in the recipe (`rl.reward.functions`, by "package.module:function"), isolated in a sandbox process.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class RewardResult:
    score: float
    correct: Optional[bool] = None  # for accuracy metrics (None: the function does not judge correctness)
    info: Dict = field(default_factory=dict)


class NonFiniteRewardError(ValueError):
    """A reward that is NaN or infinite: scored 0 and recorded as a failure, never trained on."""


def as_result(value) -> RewardResult:
    """A reward function's return value -> RewardResult (real numbers, numpy scalars included, and bools are
    accepted); a score that is not a finite number raises NonFiniteRewardError."""
    if isinstance(value, RewardResult):
        result = value
    elif isinstance(value, bool):
        result = RewardResult(float(value), correct=value)
    elif isinstance(value, numbers.Real):
        result = RewardResult(float(value))
    else:
        raise TypeError(f"a reward function must return a float, a bool or a RewardResult, got {type(value).__name__}")
    if not isinstance(result.score, numbers.Real):
        raise TypeError(f"a reward score must be a number, got {type(result.score).__name__}")
    if not math.isfinite(result.score):
        raise NonFiniteRewardError(f"reward must be a finite number, got {result.score}")
    return result


class Task(ABC):
    """Verifiable prompts: `prompts(split, n, seed)` -> records, `score(record, completion)` -> RewardResult.

    Each record carries "task" (the task name), "id" (stable across runs) and "messages" (the chat up to the
    assistant's turn), plus whatever `score` needs.
    """

    name: str

    @abstractmethod
    def prompts(self, split: str, n: int, seed: int) -> List[dict]:
        """`n` records of `split` ("train" or "test"); the same arguments give the same records everywhere."""

    @abstractmethod
    def score(self, record: dict, completion: str) -> RewardResult:
        """The verifier (deterministic, fast, trusted code)."""


_TASKS: Dict[str, type] = {}


def register_task(cls):
    """Class decorator: make a Task available by its `name` (recipes select tasks by name)."""
    _TASKS[cls.name] = cls
    return cls


def get_task(name: str) -> Task:
    from . import arithmetic, countdown, program  # noqa: F401 - the built-in tasks register themselves
    from latentforge.rl.envs import guess, python_tool  # noqa: F401 - ... and the environments' prompt tasks

    if name not in _TASKS:
        raise ValueError(f"unknown reward task {name!r}; available: {sorted(_TASKS)} (or register_task your own)")
    return _TASKS[name]()


def answer_section(record: dict, completion: str) -> str:
    """The part of a completion after its reasoning. With thinking on the generation prompt ends in <think>, so the
    completion starts inside the reasoning block: the answer is what follows the last </think>, and a completion
    that never closes the block has no answer (a number inside unfinished reasoning does not count)."""
    if "</think>" in completion:
        return completion.rsplit("</think>", 1)[1]
    return "" if record.get("enable_thinking", True) else completion
