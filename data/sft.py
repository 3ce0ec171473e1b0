"""SFT batches: chat conversations rendered in ChatML (data.chat), loss on assistant tokens only, packed
best-fit into rows of seq_len + 1 tokens with their boundaries kept in seq_idx.

Each epoch shuffles the conversations with a seed derived from (seed, epoch), packs them best-fit-decreasing
and shuffles the rows; the number of rows per epoch does not depend on the shuffle (best-fit-decreasing only sees
the multiset of lengths), so the global sample stream has fixed-size epochs like pretraining.

The reasoning switch is per conversation: `data.enable_thinking` for the built-in set and as the default of a
JSONL file, whose records may set their own `"enable_thinking": true|false` (data.chat.record_enable_thinking).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np

from latentforge.data.chat import CHAT_FORMAT_VERSION, normalize_record, record_enable_thinking, render_chat
from latentforge.data.config import BUILTIN_CHAT, BUILTIN_TOOL_CHAT, SPLITS, DataConfig, resolve_cache_dir
from latentforge.data.loader import BatchLoader
from latentforge.data.packing import best_fit_decreasing
from latentforge.data.pretrain import split_document_range
from latentforge.data.preprocess import MalformedInputError
from latentforge.data.tokenizer import Tokenizer
from latentforge.data.util import derive_seed

SFT_CACHE_VERSION = 3  # 2: a record's own enable_thinking; 3: skipped malformed lines recorded
MAX_SKIPPED_EXAMPLES = 20
log = logging.getLogger(__name__)


@dataclass
class Conversations:
    """Tokenized conversations, concatenated: conversation i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int32
    mask: np.ndarray  # bool, True on assistant tokens
    offsets: np.ndarray  # int64, n + 1
    origins: List[str]  # "file:line" / "builtin:...#k", for messages
    num_skipped: int = 0  # malformed lines skipped (data.skip_bad=true)
    skipped_examples: Sequence[str] = ()  # "file:line: reason" of the first MAX_SKIPPED_EXAMPLES

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _read_jsonl_records(path: str, skip_bad: bool, bad: List[str], enable_thinking: bool = True):
    """(origin, messages, enable_thinking) of every valid line; `enable_thinking`: the default of the file. Each
    line is decoded on its own: a line that is not UTF-8 is one malformed line, like invalid JSON."""
    from latentforge.data.util import Undecodable, read_lines

    for line_no, line in read_lines(path):
        try:
            if isinstance(line, Undecodable):
                raise ValueError(str(line))
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"invalid JSON ({err.msg} at column {err.colno})") from None
            messages = normalize_record(record)
            if not any(m["role"] == "assistant" for m in messages):
                raise ValueError("no assistant message: nothing to train on")
            thinking = record_enable_thinking(record, enable_thinking)
        except ValueError as err:
            if not skip_bad:
                raise MalformedInputError(f"{path}:{line_no}: {err} (set data.skip_bad=true to skip such lines)")
            bad.append(f"{path}:{line_no}: {err}")
            continue
        yield f"{path}:{line_no}", messages, thinking


def _data_file(path: str) -> str:
    """The absolute path of an SFT data file, or one clear error naming it."""
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise FileNotFoundError(
            f"SFT data file {full} does not exist (data.paths = {path!r}): fix the path or "
            f"use the built-in set {BUILTIN_CHAT}"
        )
    return full


def _source_records(cfg: DataConfig, split: str, bad: List[str]):
    """(origin, messages, enable_thinking) of every conversation of the split, in a fixed order."""
    for path in cfg.paths:
        if path == BUILTIN_CHAT:
            from latentforge.data.synthetic import synthetic_splits

            problems = synthetic_splits(cfg.synthetic_num_train, cfg.synthetic_num_heldout, cfg.seed)[split]
            for p in problems:
                yield f"{BUILTIN_CHAT}#{p['id']}", p["messages"], cfg.enable_thinking
        elif path == BUILTIN_TOOL_CHAT:
            from latentforge.data.tool_chat import tool_chat_splits

            for r in tool_chat_splits(cfg.synthetic_num_train, cfg.synthetic_num_heldout, cfg.seed)[split]:
                yield f"{BUILTIN_TOOL_CHAT}#{r['id']}", r["messages"], cfg.enable_thinking
        elif path.startswith("builtin:"):
            raise ValueError(
                f"unknown built-in chat source {path!r}; the built-in chat sets are {BUILTIN_CHAT} "
                f"and {BUILTIN_TOOL_CHAT}"
            )
        else:
            path = _data_file(path)
            records = list(_read_jsonl_records(path, cfg.skip_bad, bad, cfg.enable_thinking))
            keep = split_document_range(len(records), cfg.split, SPLITS.index(split))
            if len(keep) == 0:
                raise ValueError(
                    f"{path} has no conversations in the {split} split ({len(records)} in all, split "
                    f"{cfg.split!r}): add data or change data.split"
                )
            yield from records[keep.start : keep.stop]


def _cache_key(cfg: DataConfig, tokenizer: Tokenizer, split: str) -> str:
    sources = []
    for path in cfg.paths:
        if path == BUILTIN_CHAT:
            from latentforge.data.synthetic import GENERATOR_VERSION

            sources.append([path, GENERATOR_VERSION, cfg.synthetic_num_train, cfg.synthetic_num_heldout, cfg.seed])
        elif path == BUILTIN_TOOL_CHAT:
            from latentforge.data.synthetic import GENERATOR_VERSION
            from latentforge.data.tool_chat import TOOL_CHAT_VERSION

            sources.append(
                [
                    path,
                    TOOL_CHAT_VERSION,
                    GENERATOR_VERSION,
                    cfg.synthetic_num_train,
                    cfg.synthetic_num_heldout,
                    cfg.seed,
                ]
            )
        else:
            h = hashlib.sha256()
            with open(_data_file(path), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            sources.append([os.path.basename(path), h.hexdigest(), cfg.split])
    key = {
        "v": SFT_CACHE_VERSION,
        "chat": CHAT_FORMAT_VERSION,
        "tokenizer": tokenizer.fingerprint()["sha256"],
        "thinking": cfg.enable_thinking,
        "split": split,
        "sources": sources,
        "skip_bad": cfg.skip_bad,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def load_conversations(cfg: DataConfig, tokenizer: Tokenizer, split: str) -> Conversations:
    """Tokenized conversations of a split, cached under <cache_dir>/sft after the first call."""
    from latentforge.data.util import file_lock

    path = os.path.join(resolve_cache_dir(cfg.cache_dir), "sft", _cache_key(cfg, tokenizer, split) + ".npz")
    with file_lock(path + ".lock"):
        if not os.path.isfile(path):
            bad: List[str] = []
            ids, mask, offsets, origins = [], [], [0], []
            for origin, messages, thinking in _source_records(cfg, split, bad):
                chat = render_chat(tokenizer, messages, enable_thinking=thinking)
                ids.append(np.asarray(chat.ids, dtype=np.int32))
                mask.append(np.asarray(chat.assistant_mask, dtype=bool))
                offsets.append(offsets[-1] + len(chat.ids))
                origins.append(origin)
            if not origins:
                raise ValueError(f"no conversations in the {split} split of {cfg.paths}")
            if bad:
                more = ", ..." if len(bad) > MAX_SKIPPED_EXAMPLES else ""
                log.warning(
                    "%d malformed records skipped (%s%s); first: %s",
                    len(bad),
                    ", ".join(b.split(": ", 1)[0] for b in bad[:MAX_SKIPPED_EXAMPLES]),
                    more,
                    bad[0],
                )
            tmp = f"{path}.tmp-{os.getpid()}.npz"
            np.savez(
                tmp,
                ids=np.concatenate(ids),
                mask=np.concatenate(mask),
                offsets=np.asarray(offsets, dtype=np.int64),
                origins=np.asarray(origins),
                num_skipped=np.asarray(len(bad)),
                skipped_examples=np.asarray(bad[:MAX_SKIPPED_EXAMPLES], dtype=str),
            )
            os.replace(tmp, path)
    with np.load(path) as z:
        return Conversations(
            z["ids"],
            z["mask"],
            z["offsets"],
            [str(o) for o in z["origins"]],
            int(z["num_skipped"]),
            [str(e) for e in z["skipped_examples"]],
        )


class SFTSource:
    """Global sample index -> one packed row (input_ids, labels, seq_idx)."""

    def __init__(
        self,
        cfg: DataConfig,
        tokenizer: Tokenizer,
        conversations: Conversations,
        *,
        seq_len: int,
        seed: int,
        split: str,
    ):
        self.cfg, self.tokenizer, self.seq_len, self.seed, self.split = cfg, tokenizer, seq_len, seed, split
        self.conv = conversations
        self.capacity = seq_len + 1  # a row of seq_len + 1 tokens gives seq_len inputs and their next tokens
        lengths = conversations.lengths()
        too_long = np.flatnonzero(lengths > self.capacity)
        if cfg.truncation == "error" and too_long.size:
            i = int(too_long[0])
            raise ValueError(
                f"{conversations.origins[i]}: conversation of {lengths[i]} tokens exceeds seq_len + 1 = "
                f"{self.capacity} ({too_long.size} such); raise seq_len or set data.truncation to "
                "truncate or drop"
            )
        if cfg.truncation == "drop":
            self.kept = np.flatnonzero(lengths <= self.capacity)
        else:
            self.kept = np.arange(len(conversations))
        if self.kept.size == 0:
            raise ValueError(
                f"every conversation is longer than seq_len + 1 = {self.capacity} and "
                "data.truncation=drop: raise seq_len"
            )
        self.kept_lengths = np.minimum(lengths[self.kept], self.capacity)
        self.stats: Dict[str, float] = {
            "conversations": int(len(conversations)),
            "skipped_malformed": conversations.num_skipped,
            "truncated": int(too_long.size) if cfg.truncation == "truncate" else 0,
            "dropped": int(too_long.size) if cfg.truncation == "drop" else 0,
            "tokens_cut": int(np.sum(lengths[too_long] - self.capacity)) if too_long.size else 0,
        }
        self._epochs: "OrderedDict[int, List[np.ndarray]]" = OrderedDict()
        self.samples_per_epoch = len(self._epoch_rows(0))
        self.stats["rows_per_epoch"] = self.samples_per_epoch
        self.stats["fill"] = float(self.kept_lengths.sum() / (self.samples_per_epoch * self.capacity))

    def identity(self) -> dict:
        return {
            "kind": "sft",
            "seq_len": self.seq_len,
            "seed": self.seed,
            "split": self.cfg.split,
            "split_name": self.split,
            "sources": [os.path.basename(p) for p in self.cfg.paths],
            "conversations": len(self.conv),
            "tokens": int(self.conv.offsets[-1]),
            "enable_thinking": self.cfg.enable_thinking,
            "packing": self.cfg.packing,
            "truncation": self.cfg.truncation,
            "reset_at_documents": self.cfg.reset_at_documents,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def _epoch_rows(self, epoch: int) -> List[np.ndarray]:
        """Rows of the epoch, each an array of conversation indices."""
        if epoch not in self._epochs:
            rng = np.random.default_rng(derive_seed("sft", self.seed, epoch))
            perm = rng.permutation(self.kept.size)
            if self.cfg.packing:
                bins = best_fit_decreasing(self.kept_lengths[perm].tolist(), self.capacity)
                rows = [self.kept[perm[np.asarray(b)]] for b in bins]
                rows = [rows[i] for i in rng.permutation(len(rows))]
            else:
                rows = [self.kept[[j]] for j in perm]
            if epoch > 0 and len(rows) != self.samples_per_epoch:
                raise RuntimeError(f"epoch {epoch} packed into {len(rows)} rows, epoch 0 into {self.samples_per_epoch}")
            self._epochs[epoch] = rows
            while len(self._epochs) > 2:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def prepare(self, start: int, stop: int) -> None:
        pass  # epochs are packed on demand, identically on every rank, without communication

    def sample(self, index: int) -> Dict[str, np.ndarray]:
        epoch, i = divmod(index, self.samples_per_epoch)
        row = self._epoch_rows(epoch)[i]
        tokens = np.full(self.capacity, self.tokenizer.eod_id, dtype=np.int64)  # padding: </s>, no loss
        trained = np.zeros(self.capacity, dtype=bool)
        doc = np.zeros(self.capacity, dtype=np.int32)
        pos = 0
        for j, c in enumerate(row):
            lo = int(self.conv.offsets[c])
            n = min(int(self.conv.offsets[c + 1]) - lo, self.capacity)  # truncation keeps the head
            tokens[pos : pos + n] = self.conv.ids[lo : lo + n]
            trained[pos : pos + n] = self.conv.mask[lo : lo + n]
            doc[pos : pos + n] = j
            pos += n
        doc[pos:] = len(row)  # the padding is a document of its own
        labels = np.where(trained[1:], tokens[1:], -100)
        seq_idx = doc[:-1] if self.cfg.reset_at_documents else np.zeros(self.seq_len, dtype=np.int32)
        # the tail padding is routed by the MoE layers but must not count in their balance loss or expert loads
        attention_mask = np.arange(self.seq_len) < pos
        return {"input_ids": tokens[:-1], "labels": labels, "seq_idx": seq_idx, "attention_mask": attention_mask}


def build_sft_loader(
    cfg,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    micro_batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: Optional[int] = None,
    split: str = "train",
) -> BatchLoader:
    """Micro-batches of packed chat conversations for one data-parallel rank (see BatchLoader).

    `loader.source.stats` counts conversations, skipped malformed lines, truncated / dropped ones, cut tokens,
    rows per epoch and fill.
    """
    cfg = DataConfig.from_any(cfg)
    if cfg.kind != "sft":
        raise ValueError(f"build_sft_loader needs data.kind=sft, got {cfg.kind!r} (use build_pretrain_loader)")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if cfg.weights is not None:
        raise ValueError(
            "data.weights is not supported for SFT: conversations of all paths are used once per "
            "epoch; repeat a file in data.paths to up-weight it"
        )
    conversations = load_conversations(cfg, tokenizer, split)
    source = SFTSource(
        cfg, tokenizer, conversations, seq_len=seq_len, seed=cfg.seed if seed is None else seed, split=split
    )
    return BatchLoader(source, tokenizer, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
