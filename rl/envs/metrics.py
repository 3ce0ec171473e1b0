"""Per-step and evaluation statistics of environment episodes: turns, tool calls, tool errors, failures."""

from __future__ import annotations

from typing import Iterable


def episode_metrics(samples: Iterable, prefix: str = "") -> dict:
    """Means over the episode samples among `samples` (others are ignored; {} when there are none):
    turns per episode, attempted tool calls per episode, tool-error rate (calls answered with an error / attempted
    calls, malformed ones included),
    share of episodes whose environment failed, generated and observation tokens per episode."""
    episodes = [s for s in samples if s.meta.get("episode")]
    if not episodes:
        return {}
    n = len(episodes)
    calls = sum(s.reward_info.get("tool_calls", 0) for s in episodes)
    errors = sum(s.reward_info.get("tool_errors", 0) for s in episodes)
    generated = sum(s.meta.get("generated_tokens", 0) for s in episodes)
    return {
        f"{prefix}turns": sum(s.meta.get("turns", 0) for s in episodes) / n,
        f"{prefix}tool_calls": calls / n,
        f"{prefix}tool_error_rate": errors / calls if calls else 0.0,
        f"{prefix}env_failure_rate": sum(bool(s.reward_info.get("failures")) for s in episodes) / n,
        f"{prefix}generated_tokens": generated / n,
        f"{prefix}observation_tokens": sum(len(s.completion_ids) for s in episodes) / n - generated / n,
    }
