"""The generated arithmetic and word problems of `latentforge.data.synthetic` (the SFT data), verified by `check_answer`."""

from __future__ import annotations

import functools
from typing import List

from latentforge.data.synthetic import extract_answer, problem_messages, synthetic_splits

from .base import RewardResult, Task, answer_section, register_task

# The SFT data's sizes (data.synthetic_num_train / synthetic_num_heldout): the splits depend on them, so using the
# same values keeps GRPO's held-out prompts exactly the problems SFT never saw.
TRAIN_POOL, HELDOUT_POOL = 20000, 500


@functools.lru_cache(maxsize=4)
def _splits(seed: int) -> dict:
    return synthetic_splits(TRAIN_POOL, HELDOUT_POOL, seed=seed)


@register_task
class ArithmeticTask(Task):
    """ "train" prompts come from the SFT training split, "test" from its held-out test split (never trained on).
    `seed` is the data seed the SFT run used (data.seed)."""

    name = "arithmetic"

    def prompts(self, split: str, n: int, seed: int) -> List[dict]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        pool = _splits(seed)[split]
        if n > len(pool):
            raise ValueError(f"arithmetic has {len(pool)} {split} problems, {n} were asked for")
        return [
            {
                "task": self.name,
                "id": f"arithmetic-{split}-{p['id']}",
                "messages": problem_messages(p, with_solution=False),
                "question": p["question"],
                "answer": int(p["answer"]),
            }
            for p in pool[:n]
        ]

    def score(self, record: dict, completion: str) -> RewardResult:
        """1 for the exact answer. With `partial_credit` p > 0 in the record (task option), a wrong number still
        earns p * closeness, closeness = max(0, 1 - |answer - truth| / max(|truth|, 1)): a dense signal for
        policies that rarely hit the exact answer. `correct` (accuracy) is always the exact match."""
        answer_text = answer_section(record, completion)
        parsed = extract_answer(answer_text)
        correct = parsed is not None and parsed == int(record["answer"])
        score = float(correct)
        partial = float(record.get("partial_credit", 0.0))
        if not correct and partial > 0 and parsed is not None:
            truth = int(record["answer"])
            score = partial * max(0.0, 1.0 - abs(parsed - truth) / max(abs(truth), 1))
        return RewardResult(score, correct=correct, info={"parsed": parsed})
