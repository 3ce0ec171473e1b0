"""A base for environments whose model calls tools: each assistant turn's calls are run, and each answered by one
`tool` message; a turn without calls is the final answer. Malformed calls, unknown tools, bad arguments and tool
failures all become error observations the model can read and fix: they never end the loop."""

from __future__ import annotations

from typing import Awaitable, Callable, Dict, List

from .base import Environment, StepResult

ToolFn = Callable[[dict], Awaitable[str]]


class ToolError(Exception):
    """A tool's failure to report to the model (the message is the observation)."""


class ToolEnv(Environment):
    """Subclasses define `tools()` -> {name: async fn(arguments) -> text} and `finish(message)` -> StepResult for
    the turn without tool calls. Counters in every step's info (episode totals): tool_calls (attempted calls,
    malformed ones included), tool_errors (calls answered with an error)."""

    max_turns = 6

    def tools(self) -> Dict[str, ToolFn]:
        raise NotImplementedError

    async def finish(self, message: dict) -> StepResult:
        raise NotImplementedError

    async def reset(self, record: dict) -> List[dict]:
        self.record = record
        self.tool_calls = 0
        self.tool_errors = 0
        return [dict(m) for m in record["messages"]]

    async def step(self, message: dict) -> StepResult:
        calls, errors = message.get("tool_calls") or [], message.get("tool_call_errors") or []
        if not calls and not errors:
            result = await self.finish(message)
            result.info.update(self.counters())
            return result
        self.tool_calls += len(errors)  # a malformed call is an attempted call that failed
        observations = [self._error(e) for e in errors]
        tools = self.tools()
        for call in calls:
            self.tool_calls += 1
            fn = tools.get(call["name"])
            if fn is None:
                observations.append(self._error(f"unknown tool {call['name']!r}; available: {', '.join(tools)}"))
                continue
            try:
                observations.append({"role": "tool", "content": await fn(call["arguments"])})
            except ToolError as exc:
                observations.append(self._error(str(exc)))
        result = await self.after_tools(observations)
        result.info.update(self.counters())
        return result

    async def after_tools(self, observations: List[dict]) -> StepResult:
        """The step result once this turn's tools ran (default: no reward, keep going)."""
        return StepResult(observations, 0.0, False)

    def _error(self, text: str) -> dict:
        self.tool_errors += 1
        return {"role": "tool", "content": f"error: {text}"}

    def counters(self) -> dict:
        return {"tool_calls": self.tool_calls, "tool_errors": self.tool_errors}
