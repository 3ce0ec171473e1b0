"""The resumable, data-parallel batch iterator shared by pretraining and SFT.

Both flows define one global, deterministic stream of samples (index 0, 1, 2, ...; each sample one row of
`seq_len` tokens). Micro-step k of the whole job takes samples [k*B, (k+1)*B) with B = micro_batch_size * dp_size,
and DP rank r takes its contiguous slice of micro_batch_size samples (Megatron's pretraining sampler). The position
is one number, `consumed_samples`, the same on every rank: resuming with another dp_size or micro-batch size keeps
the global order, so each optimizer step (a fixed global batch) sees exactly the samples an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Dict, Protocol

import numpy as np
import torch

from latentforge.data.tokenizer import Tokenizer

STATE_VERSION = 1


class SampleSource(Protocol):
    samples_per_epoch: int

    def prepare(self, start: int, stop: int) -> None:
        """Make samples [start, stop) ready; may be collective, so every rank calls it with the same range."""

    def sample(self, index: int) -> Dict[str, np.ndarray]:
        """Global sample `index`: input_ids, labels, seq_idx, each of shape (seq_len,)."""
        ...

    def identity(self) -> dict:
        """What decides the stream's contents (sources, weights, split, seq_len, seed, options)."""
        ...


def fingerprint_of(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


class BatchLoader:
    """Iterator of micro-batches {"input_ids", "labels", "seq_idx"} for one DP rank; never runs out (it moves on
    to the next epoch, reshuffled). `state_dict()` / `load_state_dict()` save and restore the position."""

    def __init__(
        self, source: SampleSource, tokenizer: Tokenizer, *, micro_batch_size: int, dp_rank: int, dp_size: int
    ):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, dp_size={dp_size}), got {dp_rank}")
        self.source = source
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = 0
        self._tokenizer = tokenizer
        self._identity = source.identity()
        self.fingerprint = fingerprint_of(self._identity)
        self.source.prepare(0, micro_batch_size * dp_size)  # build the first epoch now: errors surface at build

    @property
    def samples_per_epoch(self) -> int:
        return self.source.samples_per_epoch

    @property
    def epoch(self) -> int:
        """The epoch of the next sample this job will read."""
        return self.consumed_samples // self.source.samples_per_epoch

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        global_batch = self.micro_batch_size * self.dp_size
        self.source.prepare(self.consumed_samples, self.consumed_samples + global_batch)
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        rows = [self.source.sample(i) for i in range(start, start + self.micro_batch_size)]
        self.consumed_samples += global_batch
        return collate(rows)

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "consumed_samples": self.consumed_samples,
            "epoch": self.epoch,
            "samples_per_epoch": self.source.samples_per_epoch,
            "fingerprint": self.fingerprint,
            "identity": self._identity,
            "tokenizer": self._tokenizer.fingerprint(),
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at a saved position. The saved tokenizer must be this one. With strict (the default) the data
        must be the same too; strict=False keeps the position but accepts changed data (a new blend)."""
        if "streams" in state or "consumed_tokens" in state:  # a run with train.seq_len_schedule
            state = stream_of_same_data(state, self.fingerprint)
        self._tokenizer.check_matches(state["tokenizer"], "the checkpoint's data position")
        if state["fingerprint"] != self.fingerprint:
            changed = {
                k: (state.get("identity", {}).get(k), v)
                for k, v in self._identity.items()
                if state.get("identity", {}).get(k) != v
            }
            message = "the data changed since the checkpoint: " + "; ".join(
                f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items()
            )
            if strict:
                raise ValueError(
                    message + ". Restore the original data config, or load with strict=False to "
                    "continue at the same sample count on the new data."
                )
            warnings.warn(message + "; continuing at the saved sample count", stacklevel=2)
        self.consumed_samples = int(state["consumed_samples"])


def stream_of_same_data(state: dict, fingerprint: str) -> dict:
    """A BatchLoader's position from a saved position of a run with train.seq_len_schedule (data/mixed_length.py):
    a run that drops its schedule continues the one order at the schedule's longest length."""
    if "consumed_tokens" in state and state["fingerprint"] == fingerprint:
        return {**state, "consumed_samples": int(state["consumed_tokens"]) // int(state["longest"])}
    if "streams" in state:  # one position per length (before the one order)
        for stream in state["streams"].values():
            if stream["fingerprint"] == fingerprint:
                return stream
    raise ValueError(
        "the checkpoint's data position is of a train.seq_len_schedule run whose longest length or data differ from "
        "this run's: set train.seq_len to that longest length, or restore the schedule"
    )


def collate(rows) -> Dict[str, torch.Tensor]:
    batch = {
        "input_ids": torch.from_numpy(np.stack([r["input_ids"] for r in rows]).astype(np.int64)),
        "labels": torch.from_numpy(np.stack([r["labels"] for r in rows]).astype(np.int64)),
        "seq_idx": torch.from_numpy(np.stack([r["seq_idx"] for r in rows]).astype(np.int32)),
    }
    if "attention_mask" in rows[0]:  # packed SFT rows: 0 on the tail padding
        batch["attention_mask"] = torch.from_numpy(np.stack([r["attention_mask"] for r in rows]).astype(bool))
    return batch


def seq_idx_from_eod(input_ids: np.ndarray, eod_id: int) -> np.ndarray:
    """Document number of each token: a new document starts after every </s> (the </s> ends its own)."""
    ends = (input_ids == eod_id).astype(np.int32)
    out = np.zeros(input_ids.shape, dtype=np.int32)
    np.cumsum(ends[:-1], out=out[1:])
    return out
