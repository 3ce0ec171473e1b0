"""`python_tool`: word problems the model solves by running Python in the sandbox, then answering 'Answer: N'.

Each `python` call runs its `code` in a fresh sandboxed interpreter (`rl.rewards.sandbox.run_untrusted_code`: no
network, a fresh temp dir, time / memory / output limits); the observation is the program's stdout, or
"error: <status>: <last line of stderr>" for a crash, a hang (timeout), too much memory or output. The final turn
(no tool call) scores 1 when its answer is right, and with the task option `partial_credit` p a wrong number earns
p * closeness, as in the arithmetic task. Env options (`env_options` of the task spec): timeout_s, memory_mb,
output_bytes, observation_chars.
"""

from __future__ import annotations

import asyncio
from typing import List

from latentforge.data.chat import TOOL_RESPONSE_CLOSE, TOOL_RESPONSE_OPEN
from latentforge.data.synthetic import extract_answer
from latentforge.data.tool_chat import PYTHON_SYSTEM
from latentforge.rl.rewards.base import RewardResult, Task, answer_section, get_task, register_task
from latentforge.rl.rewards.sandbox import run_untrusted_code

from .base import StepResult, register_env
from .tool_env import ToolEnv, ToolError

SYSTEM = PYTHON_SYSTEM  # the prompt of the builtin:tool_chat SFT transcripts


@register_env
class PythonToolEnv(ToolEnv):
    name = "python_tool"
    max_turns = 4

    def __init__(
        self,
        timeout_s: float = 5.0,
        memory_mb: int = 256,
        output_bytes: int = 4096,
        observation_chars: int = 500,
        **options,
    ):
        super().__init__(**options)
        self.limits = {"timeout_s": float(timeout_s), "memory_mb": int(memory_mb), "output_bytes": int(output_bytes)}
        self.observation_chars = int(observation_chars)

    def tools(self):
        return {"python": self.python}

    async def python(self, arguments: dict) -> str:
        code = arguments.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ToolError('python needs {"code": "<program>"}')
        result = await asyncio.to_thread(run_untrusted_code, code, **self.limits)
        if not result.ok:
            last = (result.stderr.strip().splitlines() or [""])[-1]
            reason = {
                "error": f"exit code {result.returncode}",
                "timeout": f"timeout: no result within {self.limits['timeout_s']:g}s",
                "memory": f"memory: over {self.limits['memory_mb']} MB",
                "output_limit": f"output_limit: over {self.limits['output_bytes']} bytes",
            }.get(result.status, result.status)
            raise ToolError((f"{reason}: {last}" if last else reason)[: self.observation_chars])
        return result.stdout.strip()[: self.observation_chars]

    async def finish(self, message: dict) -> StepResult:
        score = PythonToolTask().score(self.record, message["text"])
        return StepResult(None, score.score, True, {"correct": score.correct, **score.info})


@register_task
class PythonToolTask(Task):
    """The arithmetic task's word problems (same train / held-out split) with the python tool's system prompt."""

    name = "python_tool"

    def prompts(self, split: str, n: int, seed: int) -> List[dict]:
        records = get_task("arithmetic").prompts(split, n, seed)
        for r in records:
            r.update(
                task=self.name,
                env=self.name,
                id=r["id"].replace("arithmetic", self.name, 1),
                messages=[{"role": "system", "content": SYSTEM}] + r["messages"],
            )
        return records

    def score(self, record: dict, completion: str) -> RewardResult:
        """The arithmetic task's verifier: 1 for the exact answer, and with the task option `partial_credit` p a
        wrong number earns p * closeness (a dense signal for a policy that rarely hits the exact answer)."""
        return get_task("arithmetic").score(record, completion)


def answer_uses_tool_output(record: dict, completion: str) -> float:
    """A user reward function (`rl.reward.functions`) for python_tool episodes: how closely the final 'Answer: N'
    matches the number the last tool reply printed, 1 - |N - printed| / max(|printed|, 1) (at least 0); 0 without
    a numeric tool reply or an answer. It rewards reading the tool's result, whatever the code computed."""
    _, found, rest = completion.rpartition(TOOL_RESPONSE_OPEN)
    printed = rest.partition(TOOL_RESPONSE_CLOSE)[0].strip() if found else ""
    answer = extract_answer(answer_section(record, rest))
    try:
        value = int(printed)
    except ValueError:
        return 0.0
    return 0.0 if answer is None else max(0.0, 1.0 - abs(answer - value) / max(abs(value), 1))
