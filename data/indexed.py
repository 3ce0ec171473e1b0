"""Megatron's indexed dataset files (`<prefix>.bin` tokens + `<prefix>.idx` index), written and read with
megatron-core's own `IndexedDatasetBuilder` / `IndexedDataset`, plus our `<prefix>.meta.json` side file that records
the tokenizer (Megatron ignores it).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np

from latentforge.data.tokenizer import Tokenizer, TokenizerMismatchError
from latentforge.data.util import megatron_datasets

META_SUFFIX = ".meta.json"
TOKENIZER_SUFFIX = ".tokenizer.json"
# Token ids a file without a meta file may be checked against the tokenizer for (a bounded read).
UNVERIFIED_SCAN_TOKENS = 1 << 20


def normalize_prefix(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def token_dtype(vocab_size: int):
    """The dtype Megatron's own preprocessing picks for this vocabulary (uint16 below 65,500 ids, else int32)."""
    indexed_dataset = megatron_datasets()[0]
    return indexed_dataset.DType.optimal_dtype(vocab_size)


class IndexedWriter:
    """Appends documents to `<prefix>.bin/.idx` through temporary files; `commit()` renames them into place,
    `abort()` (or leaving the `with` block on an exception) deletes them: an interrupted run leaves no output."""

    def __init__(self, prefix: str, vocab_size: int, tokenizer_file: Optional[str] = None):
        indexed_dataset = megatron_datasets()[0]
        self.prefix = normalize_prefix(prefix)
        os.makedirs(os.path.dirname(self.prefix), exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        suffixes = (".bin", ".idx", META_SUFFIX, TOKENIZER_SUFFIX)
        self._tmp = {suffix: self.prefix + suffix + tag for suffix in suffixes}
        self.tokenizer_file = tokenizer_file  # copied next to the data as <prefix>.tokenizer.json
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self._builder = indexed_dataset.IndexedDatasetBuilder(self._tmp[".bin"], dtype=self.dtype)
        self.num_documents = 0
        self.num_tokens = 0
        self._done = False

    def add_document(self, ids) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self._builder.add_document(arr, [arr.size])
        self.num_documents += 1
        self.num_tokens += int(arr.size)

    def commit(self, meta: dict) -> None:
        if self.num_documents == 0:
            raise ValueError(f"no documents to write to {self.prefix}: every input was empty or skipped")
        self._builder.finalize(self._tmp[".idx"])
        with open(self._tmp[META_SUFFIX], "w") as f:
            json.dump(
                {
                    **meta,
                    "num_documents": self.num_documents,
                    "num_tokens": self.num_tokens,
                    "dtype": np.dtype(self.dtype).name,
                },
                f,
                indent=2,
            )
        order = [".bin", META_SUFFIX, ".idx"]
        if self.tokenizer_file is not None:
            shutil.copyfile(self.tokenizer_file, self._tmp[TOKENIZER_SUFFIX])
            order.insert(0, TOKENIZER_SUFFIX)
        # The .idx goes last: IndexedDataset needs both files, so a crash between renames is never mistaken
        # for a finished dataset.
        for suffix in order:
            os.replace(self._tmp[suffix], self.prefix + suffix)
        self._done = True

    def abort(self) -> None:
        if self._done:
            return
        try:
            self._builder.data_file.close()
        except Exception:  # noqa: BLE001 - best effort while cleaning up after another error
            pass
        for path in self._tmp.values():
            if os.path.exists(path):
                os.remove(path)
        self._done = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        return False


@dataclass
class PrefixInfo:
    prefix: str
    num_documents: int
    num_tokens: int
    dtype: str
    meta: Optional[dict]
    dataset: object  # megatron's IndexedDataset; keeps the memory map that `lengths` views alive
    lengths: np.ndarray  # tokens per document (a view into the .idx memory map)


def open_indexed(prefix: str):
    """megatron-core's IndexedDataset for a prefix, with a clear error when the files are missing."""
    indexed_dataset = megatron_datasets()[0]
    prefix = normalize_prefix(prefix)
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(
            f"no Megatron indexed dataset at {prefix}: missing {missing}. Write one with "
            f"`python -m latentforge.data.preprocess --input <files> --output-prefix {prefix} --tokenizer ...`"
        )
    return indexed_dataset.IndexedDataset(prefix)


def read_meta(prefix: str) -> Optional[dict]:
    path = normalize_prefix(prefix) + META_SUFFIX
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def inspect_prefix(prefix: str, tokenizer: Optional[Tokenizer] = None) -> PrefixInfo:
    """Sizes of a prefix; with a tokenizer, refuse data tokenized by another one.

    Files we wrote carry the tokenizer fingerprint in `.meta.json`; files from elsewhere (Megatron-LM) are checked
    on a bounded read: every id must be below the tokenizer's vocabulary size.
    """
    prefix = normalize_prefix(prefix)
    ds = open_indexed(prefix)
    lengths = ds.sequence_lengths
    num_tokens = int(np.sum(lengths, dtype=np.int64))
    meta = read_meta(prefix)
    if tokenizer is not None:
        if meta is not None and "tokenizer" in meta:
            tokenizer.check_matches(meta["tokenizer"], f"dataset {prefix}")
        else:
            # Only the leading documents, up to UNVERIFIED_SCAN_TOKENS tokens, in one contiguous read.
            ends = np.cumsum(lengths, dtype=np.int64)
            count = max(1, int(np.searchsorted(ends, UNVERIFIED_SCAN_TOKENS, side="right")))
            docs = ds[0:count]
            seen_max = max((int(d.max()) for d in docs if d.size), default=-1)
            if seen_max >= tokenizer.vocab_size:
                raise TokenizerMismatchError(
                    f"dataset {prefix} holds token id {seen_max}, beyond the vocabulary of the tokenizer in use "
                    f"({tokenizer.vocab_size} ids): it was tokenized with another tokenizer"
                )
    dtype = np.dtype(ds.index.dtype).name
    return PrefixInfo(prefix, len(lengths), num_tokens, dtype, meta, ds, lengths)
