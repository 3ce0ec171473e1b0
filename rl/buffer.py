"""Samples, groups, and the buffer that assembles complete groups under a hard, per-token staleness bound.

Version arithmetic: the trainer at step `s` holds weights of version `s` (version 0 = the initial weights) and its
update produces version `s + 1`. A token sampled with weights of version `u` and trained on at step `s` has
staleness `s - u`. The bound K says: every token of every sample a step trains on has staleness <= K, counted per
token, so a sequence that straddled weight updates is as stale as its OLDEST token. K = 0 is synchronous GRPO.

The buffer never hands out a group that breaks the bound: groups that became too old are dropped (and returned, so
the driver can give their prompts back to the prompt source and count them).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class Sample:
    """One completion of one prompt, as the rollout worker produced it (plus its reward, once scored)."""

    group_id: int  # the prompt's uid (its position in the prompt source's order)
    sample_index: int  # 0 .. G-1 within the group
    prompt_ids: List[int]
    completion_ids: List[int]
    logprobs: List[float]  # behaviour log-probability of each completion token under the sampling distribution
    versions: List[int]  # policy version of the weights that produced each completion token
    finish_reason: str = "stop"  # stop | length
    reward: Optional[float] = None
    reward_info: Dict = field(default_factory=dict)
    text: str = ""  # the decoded completion (for rewards and logs)
    meta: Dict = field(default_factory=dict)  # engine statistics: draft tokens proposed / accepted, timings
    # multi-turn episodes: True for model-generated tokens, False for environment observations (version -1,
    # log-prob 0, no loss); None: every completion token is generated
    completion_mask: Optional[List[bool]] = None
    # rollout routing replay: (prompt + completion tokens, trunk MoE layers, top_k) expert ids the engine chose
    # for each token it fed through the model; None: not recorded
    routes: Optional[object] = None

    def __post_init__(self):
        n = len(self.completion_ids)
        if len(self.logprobs) != n or len(self.versions) != n:
            raise ValueError(
                f"sample {self.group_id}/{self.sample_index}: {n} completion tokens but "
                f"{len(self.logprobs)} logprobs and {len(self.versions)} versions; the engine must "
                "stamp every generated token"
            )
        if self.completion_mask is not None and len(self.completion_mask) != n:
            raise ValueError(
                f"sample {self.group_id}/{self.sample_index}: {n} completion tokens but a completion "
                f"mask of {len(self.completion_mask)}"
            )

    @property
    def oldest_version(self) -> int:
        stamped = [v for v in self.versions if v >= 0]  # observation tokens carry no version
        return min(stamped) if stamped else 1 << 60

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class Group:
    group_id: int
    samples: List[Sample]

    @property
    def oldest_version(self) -> int:
        return min(s.oldest_version for s in self.samples)

    @property
    def rewards(self) -> List[float]:
        return [s.reward for s in self.samples if s.reward is not None]  # add() admits scored samples only

    def staleness(self, train_version: int) -> List[int]:
        """Per-token staleness of every token of the group at the step that trains `train_version`."""
        return [train_version - v for s in self.samples for v in s.versions if v >= 0]


class StalenessBuffer:
    """Collects scored samples into groups of G; hands out complete groups no older than K versions."""

    def __init__(self, group_size: int, max_staleness: int, filter_zero_advantage: bool = True):
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare samples within a group), got {group_size}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 (0 = synchronous), got {max_staleness}")
        self.group_size = group_size
        self.max_staleness = max_staleness
        self.filter_zero_advantage = filter_zero_advantage
        self._partial: Dict[int, Dict[int, Sample]] = {}
        self._ready: "OrderedDict[int, Group]" = OrderedDict()  # completion order (FIFO)
        self.counters = {
            "groups_completed": 0,
            "groups_zero_advantage": 0,
            "groups_stale_dropped": 0,
            "groups_served": 0,
        }

    # ----- in -------------------------------------------------------------------------------------------------
    def add(self, sample: Sample) -> Optional[str]:
        """Add one scored sample. Returns what happened to its group when this sample completed it:
        "ready", "zero_advantage" (filtered: every sample got the same reward), else None (still partial)."""
        if sample.reward is None:
            raise ValueError(f"sample {sample.group_id}/{sample.sample_index} has no reward; score it first")
        if sample.group_id in self._ready:
            raise ValueError(f"group {sample.group_id} is already complete; sample {sample.sample_index} is extra")
        slots = self._partial.setdefault(sample.group_id, {})
        if sample.sample_index in slots or not (0 <= sample.sample_index < self.group_size):
            raise ValueError(
                f"sample index {sample.sample_index} of group {sample.group_id} is a duplicate or "
                f"outside 0..{self.group_size - 1}"
            )
        slots[sample.sample_index] = sample
        if len(slots) < self.group_size:
            return None
        del self._partial[sample.group_id]
        group = Group(sample.group_id, [slots[i] for i in range(self.group_size)])
        self.counters["groups_completed"] += 1
        if self.filter_zero_advantage and len(set(group.rewards)) == 1:
            self.counters["groups_zero_advantage"] += 1
            return "zero_advantage"
        self._ready[group.group_id] = group
        return "ready"

    # ----- out ------------------------------------------------------------------------------------------------
    def evict_stale(self, train_version: int) -> List[Group]:
        """Remove and return every ready group with a token older than K at step `train_version`."""
        stale = [g for g in self._ready.values() if train_version - g.oldest_version > self.max_staleness]
        for g in stale:
            del self._ready[g.group_id]
        self.counters["groups_stale_dropped"] += len(stale)
        return stale

    def stale_partial_groups(self, train_version: int) -> List[int]:
        """Ids of partial groups that already hold a too-old token: they can never be served."""
        return [
            gid
            for gid, slots in self._partial.items()
            if any(train_version - s.oldest_version > self.max_staleness for s in slots.values())
        ]

    def drop_partial(self, group_id: int) -> List[Sample]:
        return list(self._partial.pop(group_id, {}).values())

    def num_ready(self, train_version: int) -> int:
        return sum(train_version - g.oldest_version <= self.max_staleness for g in self._ready.values())

    def pop(self, n: int, train_version: int) -> List[Group]:
        """Up to `n` complete groups (oldest first) that respect the bound at step `train_version`."""
        self.evict_stale(train_version)
        out = []
        for gid in list(self._ready)[:n]:
            out.append(self._ready.pop(gid))
        self.counters["groups_served"] += len(out)
        return out

    # ----- checkpoint -----------------------------------------------------------------------------------------
    def pending_group_ids(self) -> List[int]:
        """Groups started but not complete (their prompts must be generated again after a resume)."""
        return list(self._partial)

    def state_dict(self) -> dict:
        """Complete groups travel with the checkpoint; partial ones do not (see `pending_group_ids`)."""
        return {
            "ready": [g for g in self._ready.values()],
            "counters": dict(self.counters),
            "group_size": self.group_size,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["group_size"] != self.group_size:
            raise ValueError(
                f"checkpointed buffer has groups of {state['group_size']}, this run uses "
                f"{self.group_size}; resume with the same rollout.group_size"
            )
        self._partial.clear()
        self._ready = OrderedDict((g.group_id, g) for g in state["ready"])
        self.counters.update(state["counters"])

    def __len__(self) -> int:
        return len(self._ready)
