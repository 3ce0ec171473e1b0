"""Pretraining batches from blended Megatron indexed datasets, built by megatron-core's own dataset builders.

The global sample stream is cut into epochs of `samples_per_epoch` samples (about one pass over the split's
tokens, a function of the data only, never of the run length, so extending a run keeps the order). Epoch e is
megatron-core's `BlendedMegatronDatasetBuilder` + `GPTDataset` for the split with a seed derived from (seed, e):
documents shuffled, cut into samples of seq_len + 1 tokens, samples shuffled, sources mixed by weight. Its index
files are cached under `<cache_dir>/megatron_indices`.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from latentforge.data.config import BUILTIN_STDLIB, SPLITS, DataConfig, resolve_cache_dir, split_shares
from latentforge.data.indexed import inspect_prefix, normalize_prefix
from latentforge.data.loader import BatchLoader, seq_idx_from_eod
from latentforge.data.mixed_length import MixedLengthLoader
from latentforge.data.tokenizer import Tokenizer
from latentforge.data.util import derive_seed, megatron_datasets

_EPOCHS_KEPT = 2  # built epochs kept open (the current one and the next, around a boundary)


class _MegatronTokenizerView:
    """What megatron's GPT dataset reads from a tokenizer: the end-of-document id, the vocabulary size (for its
    token dtype) and an identity for its cache keys."""

    def __init__(self, tokenizer: Tokenizer):
        fp = tokenizer.fingerprint()
        self.eod = tokenizer.eod_id
        self.vocab_size = tokenizer.vocab_size
        self.unique_identifiers = OrderedDict(kind="latentforge", vocab_size=fp["vocab_size"], sha256=fp["sha256"])


def _builder_class():
    import torch

    _, _, blended_dataset, builder_module = megatron_datasets()
    base = builder_module.BlendedMegatronDatasetBuilder

    class Builder(base):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            if cls is blended_dataset.BlendedDataset and not torch.distributed.is_initialized():
                # megatron-core 0.16.1 calls torch.distributed.get_rank() when it caches a blend index, which fails
                # in a single process: build that (cheap, C++) index in memory instead. The per-source GPT indices,
                # the expensive part, are still cached.
                datasets, weights, size, config = args
                config = copy.copy(config)
                config.path_to_cache = None
                blend_logger = logging.getLogger(blended_dataset.__name__)
                level = blend_logger.level
                blend_logger.setLevel(logging.ERROR)  # it would warn that it can not save the index
                try:
                    return base.build_generic_dataset(
                        cls, is_built_on_rank, synchronize_ranks, datasets, weights, size, config
                    )
                finally:
                    blend_logger.setLevel(level)
            return base.build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args)

    return Builder


def split_document_range(num_documents: int, split: str, split_index: int) -> range:
    """The documents of one split, rounded exactly as megatron-core does."""
    shares = split_shares(split)
    bounds = np.concatenate([[0.0], np.cumsum(shares)])
    begin = int(round(bounds[split_index] * float(num_documents)))
    end = int(round(bounds[split_index + 1] * float(num_documents)))
    return range(begin, end)


class PretrainSource:
    """Global sample index -> one row (input_ids, labels, seq_idx) of the blended stream."""

    def __init__(
        self, cfg: DataConfig, tokenizer: Tokenizer, prefixes: List[str], *, seq_len: int, seed: int, split: str
    ):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.cfg, self.tokenizer, self.seq_len, self.seed = cfg, tokenizer, seq_len, seed
        self.split_index = SPLITS.index(split)
        self.split = split
        self.prefixes = prefixes
        infos = [inspect_prefix(p, tokenizer) for p in prefixes]
        split_tokens = []
        for info in infos:
            docs = split_document_range(info.num_documents, cfg.split, self.split_index)
            if len(docs) == 0:
                raise ValueError(
                    f"{info.prefix} has no documents in the {split} split ({info.num_documents} "
                    f"documents, split {cfg.split!r}): give it more data or change data.split"
                )
            split_tokens.append(int(np.sum(info.lengths[docs.start : docs.stop], dtype=np.int64)))
        # Epoch length: about one pass over the split's tokens (at least one sample).
        self.samples_per_epoch = max(1, (sum(split_tokens) - 1) // seq_len)
        if cfg.weights is not None:
            self.weights: Optional[List[float]] = list(cfg.weights)
        elif len(prefixes) > 1:
            self.weights = [float(t) for t in split_tokens]  # natural proportions
        else:
            self.weights = None
        self._infos = infos
        self._split_tokens = split_tokens
        self._cache = os.path.join(resolve_cache_dir(cfg.cache_dir), "megatron_indices")
        self._epochs: "OrderedDict[int, Any]" = OrderedDict()  # megatron-core datasets
        self._mask_eod_labels = cfg.masks_document_end_labels

    def identity(self) -> dict:
        return {
            "kind": "pretrain",
            "seq_len": self.seq_len,
            "seed": self.seed,
            "split": self.cfg.split,
            "split_name": self.split,
            "weights": None if self.weights is None else [w / sum(self.weights) for w in self.weights],
            "sources": [
                {
                    "name": os.path.basename(i.prefix),
                    "documents": i.num_documents,
                    "tokens": i.num_tokens,
                    "tokenizer": (i.meta or {}).get("tokenizer", {}).get("sha256"),
                }
                for i in self._infos
            ],
            "reset_at_documents": self.cfg.reset_at_documents,
            "mask_document_end_labels": self._mask_eod_labels,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def _build_epoch(self, epoch: int):
        _, gpt_dataset, _, _ = megatron_datasets()
        weights = None if self.weights is None else [w / sum(self.weights) for w in self.weights]
        config = gpt_dataset.GPTDatasetConfig(
            random_seed=derive_seed("pretrain", self.seed, epoch),
            sequence_length=self.seq_len,
            blend=(self.prefixes, weights),
            split=self.cfg.split,
            path_to_cache=self._cache,
            tokenizer=_MegatronTokenizerView(self.tokenizer),
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
            mid_level_dataset_surplus=self.cfg.mid_level_dataset_surplus,
        )
        # Build only the split this loader reads (megatron would index all three).
        config.split_matrix = [m if i == self.split_index else None for i, m in enumerate(config.split_matrix)]
        sizes = [self.samples_per_epoch if i == self.split_index else 0 for i in range(len(SPLITS))]
        built = _builder_class()(gpt_dataset.GPTDataset, sizes, lambda: True, config).build()
        dataset = built[self.split_index]
        if dataset is None or len(dataset) < self.samples_per_epoch:
            raise RuntimeError(
                f"megatron built {0 if dataset is None else len(dataset)} samples for epoch {epoch}, "
                f"expected at least {self.samples_per_epoch}"
            )
        return dataset

    def _epoch_dataset(self, epoch: int):
        if epoch not in self._epochs:
            self._epochs[epoch] = self._build_epoch(epoch)
            while len(self._epochs) > _EPOCHS_KEPT:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def prepare(self, start: int, stop: int) -> None:
        # Every rank builds the same epochs in the same order (megatron's build is collective when
        # torch.distributed is initialized: rank 0 writes the index cache, the others wait and read it).
        for epoch in range(start // self.samples_per_epoch, (stop - 1) // self.samples_per_epoch + 1):
            self._epoch_dataset(epoch)

    def sample(self, index: int) -> Dict[str, np.ndarray]:
        epoch, i = divmod(index, self.samples_per_epoch)
        item = self._epoch_dataset(epoch)[i]
        input_ids = item["tokens"].numpy()
        labels = np.where(item["loss_mask"].numpy() > 0, item["labels"].numpy(), -100)
        eod = self.tokenizer.eod_id
        if self._mask_eod_labels:
            labels = np.where(input_ids == eod, -100, labels)
        if self.cfg.reset_at_documents:
            seq_idx = seq_idx_from_eod(input_ids, eod)
        else:
            seq_idx = np.zeros(input_ids.shape, dtype=np.int32)
        return {"input_ids": input_ids, "labels": labels, "seq_idx": seq_idx}


def resolve_pretrain_prefixes(cfg: DataConfig, tokenizer: Tokenizer) -> List[str]:
    """Megatron prefixes for cfg.paths; "builtin:stdlib" is tokenized into the cache on first use."""
    prefixes = []
    for path in cfg.paths:
        if path == BUILTIN_STDLIB:
            from latentforge.data.stdlib_corpus import stdlib_prefix

            prefixes.append(stdlib_prefix(tokenizer, cfg.stdlib_max_mb, cfg.cache_dir, cfg.num_workers))
        elif path.startswith("builtin:"):
            raise ValueError(f"unknown built-in pretraining source {path!r}; the built-in corpus is {BUILTIN_STDLIB}")
        else:
            prefixes.append(normalize_prefix(path))
    return prefixes


def build_pretrain_loader(
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
    """Micro-batches of the blended pretraining stream for one data-parallel rank.

    Call it on every rank (with torch.distributed initialized, building the index is collective) and iterate the
    loaders in lockstep (one micro-batch per rank per micro-step), as a training loop does: crossing into a new
    epoch builds its index, collectively too. `seed` defaults to cfg.seed.
    """
    cfg = DataConfig.from_any(cfg)
    if cfg.kind != "pretrain":
        raise ValueError(f"build_pretrain_loader needs data.kind=pretrain, got {cfg.kind!r} (use build_sft_loader)")
    prefixes = resolve_pretrain_prefixes(cfg, tokenizer)
    source = PretrainSource(
        cfg, tokenizer, prefixes, seq_len=seq_len, seed=cfg.seed if seed is None else seed, split=split
    )
    return BatchLoader(source, tokenizer, micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)


def build_mixed_length_pretrain_loader(
    cfg,
    tokenizer: Tokenizer,
    *,
    micro_batch_sizes: Dict[int, int],
    dp_rank: int = 0,
    dp_size: int = 1,
    seed: Optional[int] = None,
    split: str = "train",
    readers: Optional[Dict[int, Tuple[int, int]]] = None,
) -> MixedLengthLoader:
    """The data of a run with train.seq_len_schedule: the blended pretraining stream cut at the longest length, as
    build_pretrain_loader builds it, every length reading consecutive slices of it (data/mixed_length.py).
    `micro_batch_sizes`: length -> sequences per micro-batch; `readers`: length -> (this rank's index, ranks)
    reading distinct sequences of that length, where it is not (dp_rank, dp_size) (a phase without CP). Call it on
    every rank, like build_pretrain_loader."""
    cfg = DataConfig.from_any(cfg)
    if cfg.kind != "pretrain":
        raise ValueError(f"train.seq_len_schedule needs data.kind=pretrain, got {cfg.kind!r}")
    prefixes = resolve_pretrain_prefixes(cfg, tokenizer)
    rows = PretrainSource(
        cfg, tokenizer, prefixes, seq_len=max(micro_batch_sizes), seed=cfg.seed if seed is None else seed, split=split
    )
    return MixedLengthLoader(
        rows, tokenizer, micro_batch_sizes=micro_batch_sizes, dp_rank=dp_rank, dp_size=dp_size, readers=readers
    )
