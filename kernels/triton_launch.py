"""Launching a Triton kernel with types that hold at run time.

Triton types `kernel[grid]` as the kernel function itself, so a type checker rejects the launch options
(`num_warps`) and plain ints passed for `tl.constexpr` parameters; at run time it is a launcher taking both."""

from __future__ import annotations

from collections.abc import Callable

from triton import JITFunction

Grid = tuple[int, ...]


def launch(kernel: JITFunction, grid: Grid) -> Callable[..., None]:
    """`kernel[grid]`: call it with the kernel's arguments, its constexprs and the launch options."""
    return kernel[grid]
