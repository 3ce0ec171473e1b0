"""Rewards: verifiable tasks (arithmetic, countdown, program), the plug-in interface, the sandbox."""

from .base import RewardResult, Task, as_result, get_task, register_task
from .sandbox import IsolatedFunction, ProgramResult, run_untrusted_code
from .scorer import RewardFunctionConfig, RewardScorer

__all__ = [
    "RewardResult",
    "Task",
    "as_result",
    "get_task",
    "register_task",
    "IsolatedFunction",
    "ProgramResult",
    "run_untrusted_code",
    "RewardFunctionConfig",
    "RewardScorer",
]
