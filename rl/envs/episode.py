"""Token-exact multi-turn episodes beside a rollout worker's engine loop.

An episode is a prompt record with an environment (`record["env"]`). Its sample's tokens are built by appending,
never by re-rendering: the generation prompt of the environment's first messages, then per turn the engine's
generated ids as they came out (loss mask 1, the engine's log-probs and versions), then the environment's
observations rendered by the chat template (`data.chat.render_observation`: "\\n", tool / user turns, the next
generation prompt; loss mask 0, log-prob 0, version -1). Generated text is decoded only to hand the environment a
message; it is never re-tokenized.

Environments run on an asyncio loop in a thread of their own, so while one awaits a tool (a sandboxed program),
the engine keeps decoding every other sequence; the next turn of an episode joins the engine's continuous batch
as a new request whose prompt is the whole episode so far.

An episode ends when the environment says done or answers nothing, at `max_turns` (the smaller of the rollout's
and the environment's), when a turn does not end with IM_END (cut by max_new_tokens: finish_reason "length"), or
when the next turn would pass `max_episode_tokens` (generated + observation tokens after the prompt: "length").
An environment that raises or returns a non-finite reward ends its episode with reward 0 and the reason in
reward_info["failures"]; it never stops the worker.
"""

from __future__ import annotations

import asyncio
import math
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from latentforge.data.chat import parse_tool_calls, render_chat, render_observation
from latentforge.rl.buffer import Sample

from .base import EpisodeEnvironment, call, make_env


@dataclass
class EpisodeLimits:
    max_turns: int = 4
    max_new_tokens: int = 96  # per assistant turn
    max_episode_tokens: int = 384  # generated + observation tokens after the first prompt
    step_timeout_s: float = 60.0  # one reset / step of an environment
    max_seq_len: int = 1 << 30  # the engine's: prompt + episode + next turn must fit


@dataclass
class _Episode:
    request: dict
    env: Optional[EpisodeEnvironment] = None  # built by the episode's reset
    prompt_ids: List[int] = field(default_factory=list)
    ids: List[int] = field(default_factory=list)  # everything after the prompt
    mask: List[bool] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    versions: List[int] = field(default_factory=list)
    turns: int = 0
    max_turns: int = 1
    reward: float = 0.0
    info: Dict = field(default_factory=dict)
    failures: List[dict] = field(default_factory=list)
    finish_reason: str = "stop"
    # EngineConfig.record_routes: per turn, the routes of the tokens that turn's request consumed first (its
    # prefill reads the previous turn's last token and the observation)
    routes: list = field(default_factory=list)

    @property
    def key(self) -> str:
        r = self.request
        attempt = f":{r['attempt']}" if r.get("attempt") is not None else ""  # a re-queued group's new try
        return f"{r.get('kind', 'train')}:{r['group_id']}:{r['sample_index']}{attempt}"


def assistant_message(text: str, thinking: bool) -> dict:
    """The environment's view of one generated turn (stop token removed). With thinking on the generation prompt
    ends in <think>, so the reasoning is the text before the first </think> (all of it, if never closed)."""
    reasoning, answer = None, text
    if thinking:
        reasoning, _, answer = text.partition("</think>") if "</think>" in text else (text, "", "")
    elif "</think>" in text:
        answer = text.split("</think>", 1)[1]
    calls, errors = parse_tool_calls(answer)
    return {
        "role": "assistant",
        "content": answer.strip(),
        "reasoning_content": (reasoning or "").strip() or None,
        "tool_calls": calls,
        "tool_call_errors": errors,
        "text": text,
    }


class EpisodeRunner:
    """Owned by one rollout worker. The worker calls `start(request)` for a request whose record names an
    environment, and hands each finished engine result of a turn (`owns(request_id)`) to `on_generated`. Turn
    requests go back to the worker through `enqueue(request)` (its request dict, plus "rid": the engine request
    id); finished episodes through `deliver(sample)`. Both are called from the environment thread."""

    def __init__(
        self,
        tokenizer,
        limits: EpisodeLimits,
        enqueue: Callable[[dict], None],
        deliver: Callable[[Sample], None],
        worker_index: int = 0,
    ):
        self.tokenizer = tokenizer
        self.limits = limits
        self.enqueue, self.deliver = enqueue, deliver
        self.worker_index = worker_index
        self.im_end_id = tokenizer.im_end_id
        self._episodes: Dict[str, _Episode] = {}  # turn request id -> episode being generated
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"episodes-{worker_index}", daemon=True)
        self._thread.start()
        self.counters = {"episodes": 0, "turns": 0, "env_failures": 0, "observation_tokens": 0}

    # ----- called from the worker's loop -------------------------------------------------------------------------
    def start(self, request: dict) -> None:
        asyncio.run_coroutine_threadsafe(self._reset(_Episode(request)), self._loop)

    def owns(self, request_id) -> bool:
        with self._lock:
            return request_id in self._episodes

    def on_generated(self, result) -> None:
        with self._lock:
            episode = self._episodes.pop(result.request_id)
        episode.ids += result.token_ids
        episode.mask += [True] * len(result.token_ids)
        episode.logprobs += [float(x) for x in result.logprobs]
        episode.versions += [int(v) for v in result.versions]
        if result.routes is not None:
            episode.routes.append(result.routes[sum(len(r) for r in episode.routes) :])
        episode.turns += 1
        self.counters["turns"] += 1
        asyncio.run_coroutine_threadsafe(self._step(episode, list(result.token_ids), result.finish_reason), self._loop)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    # ----- on the environment loop -------------------------------------------------------------------------------
    async def _reset(self, episode: _Episode) -> None:
        record = episode.request["record"]
        try:
            env = episode.env = make_env(record)
            messages = await asyncio.wait_for(call(env.reset, record), self.limits.step_timeout_s)
            episode.prompt_ids = render_chat(
                self.tokenizer,
                messages,
                add_generation_prompt=True,
                enable_thinking=record.get("enable_thinking", True),
            ).ids
        except Exception as exc:  # noqa: BLE001 - one broken episode must not stop the worker
            self._fail(episode, "reset", exc)
            episode.prompt_ids = [self.tokenizer.bos_id]  # a zero-reward sample with nothing to train
            return self._finish(episode)
        episode.max_turns = max(1, min(self.limits.max_turns, int(getattr(episode.env, "max_turns", 1 << 30))))
        self._queue_turn(episode)

    async def _step(self, episode: _Episode, generated: List[int], finish_reason: Optional[str]) -> None:
        closed = finish_reason == "stop" and generated and generated[-1] == self.im_end_id
        text = self.tokenizer.decode(generated[:-1] if finish_reason == "stop" else generated)
        thinking = episode.request["record"].get("enable_thinking", True)
        env = episode.env
        assert env is not None, "an episode's turns are queued only after its reset built the environment"
        try:
            result = await asyncio.wait_for(
                call(env.step, assistant_message(text, thinking)), self.limits.step_timeout_s
            )
            reward = float(result.reward)
            if not math.isfinite(reward):
                raise ValueError(f"the environment returned a non-finite reward {result.reward}")
        except Exception as exc:  # noqa: BLE001
            self._fail(episode, "step", exc)
            return self._finish(episode)
        episode.reward += reward
        episode.info.update(result.info or {})
        if not closed:
            episode.finish_reason = "length"
        if result.done or not result.observations or not closed or episode.turns >= episode.max_turns:
            return self._finish(episode)
        observation = render_observation(
            self.tokenizer, result.observations, enable_thinking=episode.request["record"].get("enable_thinking", True)
        )
        if len(episode.ids) + len(observation) >= self.limits.max_episode_tokens:
            episode.finish_reason = "length"
            return self._finish(episode)
        episode.ids += observation
        episode.mask += [False] * len(observation)
        episode.logprobs += [0.0] * len(observation)
        episode.versions += [-1] * len(observation)
        self.counters["observation_tokens"] += len(observation)
        self._queue_turn(episode)

    def _queue_turn(self, episode: _Episode) -> None:
        request = episode.request
        budget = min(
            self.limits.max_episode_tokens - len(episode.ids),
            self.limits.max_seq_len - len(episode.prompt_ids) - len(episode.ids),
        )
        if budget < 1:
            episode.finish_reason = "length"
            return self._finish(episode)
        turn = {k: v for k, v in request.items() if k != "record"}
        turn.update(
            prompt_ids=episode.prompt_ids + episode.ids,
            max_new_tokens=min(request.get("max_new_tokens", self.limits.max_new_tokens), budget),
            seed=None if request.get("seed") is None else hash((request["seed"], episode.turns)) & (2**63 - 1),
            rid=f"{episode.key}:turn{episode.turns}",
        )
        with self._lock:
            self._episodes[turn["rid"]] = episode
        self.enqueue(turn)

    def _fail(self, episode: _Episode, where: str, exc: Exception) -> None:
        self.counters["env_failures"] += 1
        episode.reward = 0.0
        episode.failures.append(
            {
                "function": f"env:{episode.request['record'].get('env')}.{where}",
                "status": "timeout" if isinstance(exc, asyncio.TimeoutError) else "error",
                "message": "".join(traceback.format_exception_only(type(exc), exc))[-2000:],
            }
        )

    def _finish(self, episode: _Episode) -> None:
        self.counters["episodes"] += 1
        request = episode.request
        info: Dict[str, Any] = dict(episode.info, turns=episode.turns)
        info.setdefault("correct", None)
        if episode.failures:
            info["failures"] = episode.failures
        generated = [t for t, m in zip(episode.ids, episode.mask) if m]
        self.deliver(
            Sample(
                group_id=request["group_id"],
                sample_index=request["sample_index"],
                prompt_ids=list(episode.prompt_ids),
                completion_ids=list(episode.ids),
                logprobs=episode.logprobs,
                versions=episode.versions,
                finish_reason=episode.finish_reason,
                reward=episode.reward,
                reward_info=info,
                text=self.tokenizer.decode(episode.ids),
                meta={
                    "kind": request.get("kind", "train"),
                    "worker": self.worker_index,
                    "attempt": request.get("attempt"),
                    "episode": True,
                    "turns": episode.turns,
                    "generated_tokens": len(generated),
                },
                completion_mask=list(episode.mask),
                routes=torch.cat(episode.routes) if episode.routes else None,
            )
        )
