"""One data order for a run that mixes sequence lengths (train.seq_len_schedule).

The stream is the blended pretraining stream cut at the schedule's LONGEST length (its rows shuffled at that
granularity, documents contiguous inside a row), read as one run of tokens: a step of length L takes consecutive
L-token slices of it (every length divides the longest). So a 1M step and 256 4K steps read the same tokens in the
same order, no token is read twice per epoch, and the order does not depend on the schedule. A slice keeps its
row's labels (each position's next token, the one after a slice's last token being the next slice's first) and
renumbers its document ids from 0. The position is one number, `consumed_tokens`, the same on every rank; it is a
multiple of the step's length at every step boundary, since the token budget of a step is.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

from latentforge.data.loader import STATE_VERSION, BatchLoader, SampleSource, fingerprint_of
from latentforge.data.tokenizer import Tokenizer

# a saved position in tokens of the one order (version 1 was one position per length)
SHARED_ORDER_VERSION = STATE_VERSION + 1


class SlicedSource:
    """Slice i is tokens [i * seq_len, (i + 1) * seq_len) of the rows of `rows` (each `row_len` tokens) laid end to
    end; `seq_len` divides `row_len`, so a slice lies in one row."""

    def __init__(self, rows: SampleSource, row_len: int, seq_len: int):
        if row_len % seq_len:
            raise ValueError(f"sequence length {seq_len} must divide the longest length {row_len}")
        self.rows, self.seq_len, self.per_row = rows, seq_len, row_len // seq_len
        self.samples_per_epoch = rows.samples_per_epoch * self.per_row

    def prepare(self, start: int, stop: int) -> None:
        self.rows.prepare(start // self.per_row, (stop - 1) // self.per_row + 1)

    def sample(self, index: int) -> Dict[str, np.ndarray]:
        row, part = divmod(index, self.per_row)
        cut = slice(part * self.seq_len, (part + 1) * self.seq_len)
        out = {key: value[cut] for key, value in self.rows.sample(row).items()}
        out["seq_idx"] = (out["seq_idx"] - out["seq_idx"][0]).astype(np.int32)  # documents counted from the slice
        return out

    def identity(self) -> dict:
        return {**self.rows.identity(), "slice_len": self.seq_len}


class _Stream:
    """The micro-batches of one length, read at the loader's shared position."""

    def __init__(self, owner: "MixedLengthLoader", seq_len: int):
        self.owner, self.seq_len = owner, seq_len

    def __iter__(self):
        return self

    def __next__(self):
        owner, loader = self.owner, self.owner.loaders[self.seq_len]
        if owner.consumed_tokens % self.seq_len:
            raise RuntimeError(
                f"the data position {owner.consumed_tokens} is inside a sequence of {self.seq_len} tokens: a length "
                "changed inside a step"
            )
        loader.consumed_samples = owner.consumed_tokens // self.seq_len
        batch = next(loader)
        owner.consumed_tokens = loader.consumed_samples * self.seq_len
        return batch


class MixedLengthLoader:
    """The data of a run with train.seq_len_schedule: `stream(L)` yields this rank's micro-batches of L tokens, all
    lengths reading the one order of `rows` (rows of the longest length). `micro_batch_sizes`: length -> sequences
    per micro-batch; `readers`: length -> (this rank's index, ranks) reading distinct sequences of that length,
    where it is not (dp_rank, dp_size) (a phase without CP)."""

    def __init__(
        self,
        rows: SampleSource,
        tokenizer: Tokenizer,
        *,
        micro_batch_sizes: Dict[int, int],
        dp_rank: int = 0,
        dp_size: int = 1,
        readers: Optional[Dict[int, Tuple[int, int]]] = None,
    ):
        if not micro_batch_sizes:
            raise ValueError("MixedLengthLoader needs at least one sequence length")
        self.longest = max(micro_batch_sizes)
        self.consumed_tokens = 0
        self._tokenizer = tokenizer
        self._identity = rows.identity()
        self.fingerprint = fingerprint_of(self._identity)
        self.loaders = {}
        for length, micro in micro_batch_sizes.items():
            rank, ranks = (readers or {}).get(length, (dp_rank, dp_size))
            source = SlicedSource(rows, self.longest, length)
            self.loaders[length] = BatchLoader(source, tokenizer, micro_batch_size=micro, dp_rank=rank, dp_size=ranks)

    def stream(self, seq_len: int) -> _Stream:
        if seq_len not in self.loaders:
            raise KeyError(f"no data stream of sequence length {seq_len}; lengths: {sorted(self.loaders)}")
        return _Stream(self, seq_len)

    def state_dict(self) -> dict:
        return {
            "version": SHARED_ORDER_VERSION,
            "consumed_tokens": self.consumed_tokens,
            "longest": self.longest,
            "fingerprint": self.fingerprint,
            "identity": self._identity,
            "tokenizer": self._tokenizer.fingerprint(),
        }

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """The saved position. A checkpoint of a run without the schedule at the longest length continues there;
        the per-length positions of earlier versions are refused (their streams repeated tokens across lengths)."""
        if "streams" in state:
            raise ValueError(
                "the checkpoint's data position is one position per sequence length (train.seq_len_schedule before "
                "the one data order); it cannot be mapped onto the one order: start the data from a new run_dir, or "
                "resume with the commit that wrote it"
            )
        if "consumed_tokens" not in state:  # a run without the schedule: its rows must be the longest length's
            state = {**state, "consumed_tokens": int(state["consumed_samples"]) * self.longest}
        self._tokenizer.check_matches(state["tokenizer"], "the checkpoint's data position")
        if state["fingerprint"] != self.fingerprint:
            message = (
                "the checkpoint's data position is of other data or another longest length "
                f"({state.get('identity', {}).get('seq_len')!r}, this run's {self.longest})"
            )
            if strict:
                raise ValueError(message + ": restore the original data config and schedule, or load with strict=False")
            import warnings

            warnings.warn(message + "; continuing at the saved token count", stacklevel=2)
        self.consumed_tokens = int(state["consumed_tokens"])
