"""The environment interface of multi-turn RL, and its registry.

An environment plays one episode against the policy:

    messages = await env.reset(record)           # the conversation the model answers first
    result = await env.step(assistant_message)   # StepResult(observations, reward, done, info)

`record` is the prompt record (a task's fields: question, answer, ...). `assistant_message` is
{"role": "assistant", "content": answer text, "reasoning_content": reasoning or None, "tool_calls": [...],
"tool_call_errors": [...], "text": the raw generated text} parsed from what the model generated (malformed
calls are in `tool_call_errors`, to answer as error observations). `observations` are the messages the environment
answers with (usually one `tool` message per call, or a `user` turn); None or [] ends the episode. The episode's
reward is the sum of its steps' rewards (GRPO scores episodes).

Async-safe: every episode gets its own instance (environments keep per-episode state on `self`), and the rollout
worker awaits `reset` / `step` on an event loop of its own, so a slow environment never stalls generation. Write them
as `async def`; plain `def` methods are run in a worker thread. Blocking work inside an `async def` (a sandboxed
program) belongs in `await asyncio.to_thread(...)`.

Registered by name (`@register_env`) or given as "package.module:Class" in a task spec (`env:` key of an entry of
rl.prompts.tasks), like user reward functions.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol

from latentforge.model.errors import UserError


class EnvSpecError(UserError, ValueError):
    """An environment that cannot be found or built; the message names it and the fix."""


@dataclass
class StepResult:
    observations: Optional[List[dict]]  # messages appended before the next assistant turn; None / []: no more
    reward: float = 0.0
    done: bool = False
    info: Dict = field(default_factory=dict)  # merged into the episode's reward_info (later steps win)


class Environment:
    """Base class: override `reset` and `step` (async or plain). `max_turns` is the environment's own turn cap
    (the rollout's `max_turns` caps it further)."""

    name = "environment"
    max_turns: int = 8

    def __init__(self, **options):
        self.options = options

    async def reset(self, record: dict) -> List[dict]:
        return [dict(m) for m in record["messages"]]

    async def step(self, message: dict) -> StepResult:
        raise NotImplementedError(f"{type(self).__name__}.step")


class EpisodeEnvironment(Protocol):
    """What an episode calls: an `Environment`, or any class with reset() and step() (async or plain) named as
    "package.module:Class"."""

    def reset(self, record: dict, /) -> Any: ...

    def step(self, message: dict, /) -> Any: ...


_ENVS: Dict[str, type] = {}


def register_env(cls):
    """Class decorator: make an Environment available by its `name`."""
    _ENVS[cls.name] = cls
    return cls


def env_class(spec: str) -> type:
    """A registered name, or "package.module:Class"."""
    from . import guess, python_tool, task_env  # noqa: F401 - the built-ins register themselves

    if spec in _ENVS:
        return _ENVS[spec]
    if ":" not in spec:
        raise EnvSpecError(f"unknown environment {spec!r}; registered: {sorted(_ENVS)}, or give 'package.module:Class'")
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise EnvSpecError(
            f"environment {spec!r} could not be loaded ({exc}); check the module is importable "
            "on every rollout worker (PYTHONPATH) and the class name"
        ) from None
    if not (isinstance(obj, type) and hasattr(obj, "step") and hasattr(obj, "reset")):
        raise EnvSpecError(f"environment {spec!r} is not a class with reset() and step()")
    return obj


def make_env(record: dict) -> EpisodeEnvironment:
    """A fresh environment for one episode of `record` (its "env" names the class, "env_options" its options)."""
    return env_class(record["env"])(**dict(record.get("env_options") or {}))


async def call(method, *args):
    """Await an environment method, running a plain (blocking) one in a thread."""
    if inspect.iscoroutinefunction(method):
        return await method(*args)
    result = await asyncio.to_thread(method, *args)
    if inspect.isawaitable(result):
        result = await result
    return result
