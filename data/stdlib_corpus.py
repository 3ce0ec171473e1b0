"""The embedded default pretraining corpus: the Python standard library's own source files.

Every machine that runs LatentForge has them (located through `sysconfig`), so the tiny recipes train without a
download. The corpus is bounded (the first N MB of .py files in sorted path order, tests and site-packages left
out), tokenized once per tokenizer on first use and cached as a Megatron indexed dataset.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from typing import Iterator, List, Optional

from latentforge.data.config import resolve_cache_dir

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


@functools.lru_cache(maxsize=None)
def _all_stdlib_files() -> tuple:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    if not found:
        raise FileNotFoundError(f"no .py files under the standard library at {root}; configure data.paths instead")
    return tuple(found)


def stdlib_files(max_mb: float) -> List[str]:
    """The first files of the sorted stdlib listing whose sizes add up to at most `max_mb` MB (at least one)."""
    budget = max_mb * 1e6
    chosen, total = [], 0
    for path in _all_stdlib_files():
        size = os.path.getsize(path)
        if chosen and total + size > budget:
            break
        chosen.append(path)
        total += size
    return chosen


@functools.lru_cache(maxsize=None)
def corpus_key(max_mb: float) -> str:
    """Identifies the exact bounded corpus (Python version and file contents), for cache names."""
    h = hashlib.sha256(f"{sys.version_info[:3]}".encode())
    root = sysconfig.get_paths()["stdlib"]
    for path in stdlib_files(max_mb):
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return f"py{sys.version_info[0]}{sys.version_info[1]}-{max_mb:g}mb-{h.hexdigest()[:12]}"


def iter_stdlib_texts(max_mb: float) -> Iterator[str]:
    """The bounded corpus, one string per source file, read through Hugging Face `datasets`."""
    from latentforge.data.preprocess import iter_text_documents

    for _file, _line, text in iter_text_documents(stdlib_files(max_mb), text_unit="document"):
        yield text


def stdlib_prefix(tokenizer, max_mb: float = 8.0, cache_dir: Optional[str] = None, num_workers: int = 2) -> str:
    """The Megatron prefix of the corpus tokenized with `tokenizer`, built on first use (under a file lock)."""
    from latentforge.data.indexed import normalize_prefix
    from latentforge.data.preprocess import preprocess
    from latentforge.data.util import file_lock

    tok_key = tokenizer.fingerprint()["sha256"][:12]
    prefix = os.path.join(resolve_cache_dir(cache_dir), "corpus", f"stdlib-{corpus_key(max_mb)}-tok{tok_key}", "stdlib")
    if not os.path.isfile(prefix + ".idx"):
        with file_lock(prefix + ".lock"):
            if not os.path.isfile(prefix + ".idx"):
                preprocess(
                    stdlib_files(max_mb),
                    prefix,
                    tokenizer,
                    fmt="text",
                    text_unit="document",
                    num_workers=num_workers,
                    progress=False,
                )
    return normalize_prefix(prefix)
