"""Differentiable collectives used by tensor, sequence, context and expert parallelism.

Each is an autograd Function whose backward is the adjoint collective:
    gather_along(x, dim)        all-gather          <-> reduce-scatter (sum)
    scatter_along(x, dim)       reduce-scatter (sum) <-> all-gather
    all_to_all(x, out, in)      uneven all-to-all    <-> the reverse all-to-all
All shard along one dimension in rank order; `group` None or of size 1 makes them the identity.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

Group = Optional[dist.ProcessGroup]  # None: a single rank (the collectives are the identity)


def _size(group: Group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _all_gather(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = _size(group)
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
    if hasattr(dist, "all_gather_single"):
        dist.all_gather_single(out, x, group=group)
    else:  # torch < 2.12
        dist.all_gather_into_tensor(out, x, group=group)
    return out.movedim(0, dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    n = _size(group)
    if x.shape[dim] % n:
        raise ValueError(f"reduce-scatter: dimension {dim} of size {x.shape[dim]} does not split over {n} ranks")
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    if hasattr(dist, "reduce_scatter_single"):
        dist.reduce_scatter_single(out, x, op=dist.ReduceOp.SUM, group=group)
    else:  # torch < 2.12
        dist.reduce_scatter_tensor(out, x, op=dist.ReduceOp.SUM, group=group)
    return out.movedim(0, dim)


class _GatherAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _all_gather(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        return _reduce_scatter(grad, ctx.dim, ctx.group), None, None


class _ScatterAlong(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        return _reduce_scatter(x, dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], None, None]:
        return _all_gather(grad, ctx.dim, ctx.group), None, None


def gather_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (rank order); the gradient is reduce-scattered back."""
    if _size(group) == 1:
        return x
    return _GatherAlong.apply(x, dim, group)


def scatter_along(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    """Sum `x` over the ranks and keep this rank's slice of `dim`; the gradient is all-gathered back."""
    if _size(group) == 1:
        return x
    return _ScatterAlong.apply(x, dim, group)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: Group) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        output_splits, input_splits = ctx.splits
        back = grad.new_empty((sum(input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(
    x: torch.Tensor, output_splits: Sequence[int], input_splits: Sequence[int], group: Group
) -> torch.Tensor:
    """Uneven all-to-all along dim 0: rows [input_splits] go to each rank, [output_splits] come from each."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


def keep_in_graph(out: torch.Tensor, collective_output: torch.Tensor) -> torch.Tensor:
    """`out`, made to depend (with zero weight) on a collective's output that this rank does not otherwise use.

    The backward of a collective is itself a collective: every rank of the group must reach it, or the ranks that
    did wait forever."""
    return out + 0.0 * collective_output.sum()


def all_reduce_sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    """In-place sum over `group` of a tensor that needs no gradient (counts, statistics)."""
    if _size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x
