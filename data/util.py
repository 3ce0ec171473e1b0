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


# ----- reading text line by line: one undecodable line is one bad record, never a lost file -------------------
class Undecodable(str):
    """Stands for a line (or paragraph) that is not valid UTF-8; its text is the reason."""


def open_binary(path: str):
    """`path` for binary reading, decompressing .gz / .bz2 / .xz / .zst by extension."""
    name = path.lower()
    if name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        import bz2

        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        import lzma

        return lzma.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard  # pyright: ignore[reportMissingImports]  (optional: only .zst inputs need it)
        except ImportError:
            raise ValueError(
                f"{path}: reading .zst files needs the zstandard package (pip install zstandard), or "
                "decompress it first"
            ) from None
        return zstandard.open(path, "rb")
    return open(path, "rb")


def _decode(raw: bytes, first_line: int):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1)
        return Undecodable(f"not valid UTF-8 ({err.reason} at byte {column} of line {line}); convert the file to UTF-8")


def _normalized_lines(path: str):
    """Raw lines ending in b"\\n" (b"\\r\\n" read as b"\\n"), the UTF-8 byte-order mark dropped."""
    with open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            if line_no == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if raw.endswith(b"\r\n"):
                raw = raw[:-2] + b"\n"
            yield line_no, raw


def read_lines(path: str):
    """(line number, text without its line break) of every line of `path`; a line that is not UTF-8 comes as an
    `Undecodable` (the reason), the lines around it unaffected."""
    for line_no, raw in _normalized_lines(path):
        yield line_no, _decode(raw[:-1] if raw.endswith(b"\n") else raw, line_no)


def read_paragraphs(path: str):
    """(first line number, text) of every non-empty blank-line-separated paragraph (the text split at each
    "\\n\\n", as `datasets`' paragraph reader does); a paragraph that is not UTF-8 comes as an `Undecodable`."""
    buf, start_line, seen = bytearray(), 1, 0
    for _line_no, raw in _normalized_lines(path):
        buf += raw
        while True:
            cut = buf.find(b"\n\n", max(0, seen - 1))
            if cut < 0:
                seen = len(buf)
                break
            if cut:
                yield start_line, _decode(bytes(buf[:cut]), start_line)
            start_line += buf.count(b"\n", 0, cut + 2)
            del buf[: cut + 2]
            seen = 0
    if buf:
        yield start_line, _decode(bytes(buf), start_line)
