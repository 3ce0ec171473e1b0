"""`guess_number`: find a hidden integer with a `check` tool that answers "higher", "lower" or "correct".

The episode's reward is the closeness of the best guess so far, 1 - |guess - target| / (high - low + 1), and 1 for
the exact number: each step's reward is the improvement, so the episode total at any turn limit is the best
closeness reached and more informative turns raise it. A final turn without a call may answer 'Answer: N' (counted
as a guess).
"""

from __future__ import annotations

import random
from typing import List

from latentforge.data.synthetic import extract_answer
from latentforge.data.tool_chat import GUESS_PROMPT, GUESS_RANGES
from latentforge.data.util import derive_seed
from latentforge.rl.rewards.base import RewardResult, Task, answer_section, register_task

from .base import StepResult, register_env
from .tool_env import ToolEnv, ToolError

PROMPT = GUESS_PROMPT


def closeness(guess: int, record: dict) -> float:
    span = record["high"] - record["low"] + 1
    return 1.0 if guess == record["answer"] else max(0.0, 1.0 - abs(guess - record["answer"]) / span)


@register_env
class GuessNumberEnv(ToolEnv):
    name = "guess_number"
    max_turns = 8

    async def reset(self, record: dict):
        self.best = 0.0  # closeness of the best guess so far
        self.rewarded = 0.0  # the part of `best` already paid out as step rewards
        self.solved = False
        return await super().reset(record)

    def tools(self):
        return {"check": self.check}

    async def check(self, arguments: dict) -> str:
        guess = arguments.get("guess")
        if isinstance(guess, bool) or not isinstance(guess, (int, float)) or int(guess) != guess:
            raise ToolError('check needs {"guess": <integer>}')
        guess = int(guess)
        self._score(guess)
        target = self.record["answer"]
        return "correct" if guess == target else ("higher" if target > guess else "lower")

    def _score(self, guess: int) -> None:
        self.best = max(self.best, closeness(guess, self.record))
        self.solved = self.solved or guess == self.record["answer"]

    def _payout(self) -> float:
        gained, self.rewarded = self.best - self.rewarded, self.best
        return gained

    async def after_tools(self, observations):
        return StepResult(None if self.solved else observations, self._payout(), self.solved, {"correct": self.solved})

    async def finish(self, message: dict) -> StepResult:
        parsed = extract_answer(answer_section(self.record, message["text"]))
        if parsed is not None:
            self._score(parsed)
        return StepResult(None, self._payout(), True, {"correct": self.solved})


@register_task
class GuessNumberTask(Task):
    name = "guess_number"

    def prompts(self, split: str, n: int, seed: int) -> List[dict]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(derive_seed("guess_number", split, seed))
        records = []
        for i in range(n):
            low, high = 1, rng.choice(GUESS_RANGES)
            records.append(
                {
                    "task": self.name,
                    "env": self.name,
                    "id": f"guess_number-{split}-{seed}-{i}",
                    "low": low,
                    "high": high,
                    "answer": rng.randint(low, high),
                    "messages": [{"role": "user", "content": PROMPT.format(low=low, high=high)}],
                }
            )
        return records

    def score(self, record: dict, completion: str) -> RewardResult:
        parsed = extract_answer(answer_section(record, completion))
        value = 0.0 if parsed is None else closeness(parsed, record)
        return RewardResult(value, correct=parsed == record["answer"], info={"parsed": parsed})
