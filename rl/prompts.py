"""The prompt source: a deterministic, endless, resumable order over the training prompts of the chosen tasks.

Every prompt handed out gets a uid: its position in the endless order (epoch * N + index, a fresh shuffle per
epoch). The order is a pure function of (records, seed), so the state is two things: the next uid to hand out, and
the uids given back to be served again first (prompts that were in flight at a checkpoint, or whose group was
dropped as too stale). After a resume no prompt is skipped and none is served twice.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from typing import Dict, List, Sequence, Tuple

import numpy as np

from latentforge.data.chat import render_chat


class PromptSource:
    def __init__(self, records: Sequence[dict], seed: int = 0, shuffle: bool = True):
        if not records:
            raise ValueError("the prompt source is empty: choose at least one task with prompts (rl.prompts.tasks)")
        self.records = list(records)
        self.seed = seed
        self.shuffle = shuffle
        self.next_uid = 0
        self._returned: deque = deque()
        self._orders: Dict[int, np.ndarray] = {}
        self.fingerprint = hashlib.sha256(json.dumps([r["id"] for r in self.records]).encode()).hexdigest()[:16]

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.records)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._orders = {epoch: order}  # only the current epoch is ever needed again
        return self._orders[epoch]

    def record(self, uid: int) -> dict:
        n = len(self.records)
        return self.records[int(self._order(uid // n)[uid % n])]

    def take(self) -> Tuple[int, dict]:
        """The next prompt: a given-back one first (oldest uid first), else the next in the order."""
        if self._returned:
            uid = self._returned.popleft()
        else:
            uid = self.next_uid
            self.next_uid += 1
        return uid, self.record(uid)

    def give_back(self, uids) -> None:
        """Serve these prompts again (before any new one), e.g. in flight at a checkpoint or dropped as stale."""
        merged = sorted(set(self._returned) | {int(u) for u in uids})
        if any(u >= self.next_uid for u in merged):
            raise ValueError(f"cannot give back uids that were never handed out (next uid {self.next_uid})")
        self._returned = deque(merged)

    @property
    def epoch(self) -> int:
        return self.next_uid // len(self.records)

    def state_dict(self) -> dict:
        return {
            "next_uid": self.next_uid,
            "returned": list(self._returned),
            "seed": self.seed,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint or state["seed"] != self.seed:
            raise ValueError(
                "the checkpoint's prompt source was built from other prompts or another seed "
                f"(fingerprint {state['fingerprint']} seed {state['seed']}, now {self.fingerprint} "
                f"seed {self.seed}); resume with the same rl.prompts settings"
            )
        self.next_uid = int(state["next_uid"])
        self._returned = deque(int(u) for u in state["returned"])


def build_records(tasks: Sequence[dict], split: str, seed: int, enable_thinking: bool = True) -> List[dict]:
    """Records of several tasks, e.g. [{"name": "arithmetic", "num": 2000, "partial_credit": 0.5},
    {"name": "countdown", "num": 500}]. Keys besides name / num / seed are task options, copied into every record
    (the verifier reads them from there)."""
    from latentforge.rl.rewards import get_task

    records = []
    for spec in tasks:
        task = get_task(spec["name"])
        options = {k: v for k, v in spec.items() if k not in ("name", "num", "seed")}
        for r in task.prompts(split, int(spec["num"]), int(spec.get("seed", seed))):
            r.update(options, enable_thinking=enable_thinking)
            records.append(r)
    return records


def prompt_token_ids(tokenizer, record: dict) -> List[int]:
    """The generation prompt of a record: its chat rendered up to the opened assistant turn."""
    return render_chat(
        tokenizer, record["messages"], enable_thinking=record.get("enable_thinking", True), add_generation_prompt=True
    ).ids
