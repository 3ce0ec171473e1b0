"""When to take the Triton fast path."""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install must not break the reference path
        return False
    return True


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """True when every given tensor lives on CUDA and Triton imports.

    ``LATENTFORGE_KERNELS=ref`` forces the references (read on every call so tests can flip it)."""
    if os.environ.get("LATENTFORGE_KERNELS", "").lower() == "ref":
        return False
    present = [t for t in tensors if t is not None]
    if not present or not all(t.is_cuda for t in present):
        return False
    return triton_available()


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32, or fp64 when an input is fp64 (so references can be checked against float64 loops)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32
