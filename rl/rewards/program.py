"""Program synthesis: the model writes a Python program that prints the answer to an arithmetic problem; the
program runs in the sandbox (time and memory limits) and scores 1 when its last printed line is the answer.
A program that hangs, crashes or exhausts memory scores 0, and the reason is reported in the reward info."""

from __future__ import annotations

import re
from typing import List

from .arithmetic import ArithmeticTask
from .base import RewardResult, Task, answer_section, register_task
from .sandbox import run_untrusted_code

INSTRUCTION = "Write a Python program that prints the answer, in a ```python code block."
_CODE_RE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def extract_code(text: str):
    blocks = _CODE_RE.findall(text)
    return blocks[-1] if blocks else None


@register_task
class ProgramTask(Task):
    name = "program"
    timeout_s = 2.0
    memory_mb = 256

    def prompts(self, split: str, n: int, seed: int) -> List[dict]:
        records = ArithmeticTask().prompts(split, n, seed)
        for r in records:
            r["task"] = self.name
            r["id"] = r["id"].replace("arithmetic", "program", 1)
            r["messages"] = [{"role": "user", "content": f"{r['question']}\n{INSTRUCTION}"}]
        return records

    def score(self, record: dict, completion: str) -> RewardResult:
        code = extract_code(answer_section(record, completion))
        if code is None:
            return RewardResult(0.0, correct=False, info={"status": "no_code"})
        result = run_untrusted_code(code, timeout_s=self.timeout_s, memory_mb=self.memory_mb)
        lines = result.stdout.strip().splitlines()
        correct = result.ok and bool(lines) and lines[-1].strip() == str(record["answer"])
        return RewardResult(
            float(correct), correct=correct, info={"status": result.status, "wall_s": round(result.wall_s, 3)}
        )
