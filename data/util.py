"""Small shared helpers: file locks for first-use caches, quiet imports of Hugging Face datasets and megatron."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import warnings


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive lock held through a lock file, so concurrent ranks/processes build a cache entry once."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def hf_datasets():
    """The Hugging Face `datasets` module, forced offline: we only ever read local files."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def megatron_datasets():
    """megatron.core.datasets modules (importing megatron.core prints Transformer Engine / Apex warnings that do
    not concern its CPU data layer)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets import blended_megatron_dataset_builder, blended_dataset, gpt_dataset
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset, gpt_dataset, blended_dataset, blended_megatron_dataset_builder


def derive_seed(*parts) -> int:
    """A 32-bit seed (what numpy.random.RandomState and Megatron accept) from any mix of ints and strings."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return int.from_bytes(digest[:4], "little")
