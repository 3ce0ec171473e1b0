"""Single-turn tasks (arithmetic, countdown, program, user tasks) as one-step environments: the model answers once
and the task's verifier scores the answer, so one rollout path serves single- and multi-turn training."""

from __future__ import annotations

from latentforge.rl.rewards.base import get_task

from .base import Environment, StepResult, register_env


@register_env
class TaskEnv(Environment):
    """reset: the record's messages; step: the verifier of the record's task on the raw completion text; done."""

    name = "task"
    max_turns = 1

    async def step(self, message: dict) -> StepResult:
        result = get_task(self.record["task"]).score(self.record, message["text"])
        return StepResult(None, float(result.score), True, {"correct": result.correct, **result.info})

    async def reset(self, record: dict):
        self.record = record
        return [dict(m) for m in record["messages"]]
