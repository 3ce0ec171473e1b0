"""Gradient bookkeeping across ranks: the tensor-parallel sum of replicated weights, the sum of the pipeline's two
embedding copies (first stage, and last stage for MTP: stage.py), and the global grad norm.

Under sequence parallelism every weight that is *not* split over the TP group (norms, router, embedding, lm_head,
latent projections, routed experts) sees only this rank's tokens, so its gradient is a partial sum over the TP
group. FSDP already summed it over the data-parallel (and CP) ranks; one bucketed all-reduce over TP finishes it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, TypeGuard

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


def _is_dtensor(t: object) -> TypeGuard[DTensor]:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if _is_dtensor(t) else t


def tp_sharded(param) -> bool:
    return _is_dtensor(param) and "tp" in (param.device_mesh.mesh_dim_names or ())


def parameters(parts: list) -> list:
    seen, params = set(), []
    for part in parts:
        for p in part.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return params


@torch.no_grad()
def all_reduce_replicated_grads(parts: list, tp_group) -> None:
    """Sum the gradients of every non-TP-sharded parameter over the TP group (one flat bucket per dtype)."""
    if tp_group is None:
        return
    by_dtype: dict = {}
    for p in parameters(parts):
        if not p.requires_grad or tp_sharded(p):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(_local(p.grad).dtype, []).append(_local(p.grad))
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=tp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def all_reduce_shared_embedding_grads(embedding_weight, group) -> None:
    """Sum the embedding gradient of the first and the last pipeline stage over `group` (those two ranks of one
    pipeline, same position in every other mesh dimension): both copies are sharded alike, so the local shards
    pair up, and with equal sums the equal copies stay equal through the optimizer step."""
    if embedding_weight is None or group is None or not embedding_weight.requires_grad:
        return
    if embedding_weight.grad is None:  # e.g. a loss hook that never ran the MTP block
        embedding_weight.grad = torch.zeros_like(embedding_weight)
    dist.all_reduce(_local(embedding_weight.grad), group=group)


def _distinct_shards(t) -> int:
    """How many different pieces a tensor is split into across its mesh (1 for a plain tensor)."""
    if not _is_dtensor(t):
        return 1
    mesh = t.device_mesh
    count = 1
    for dim, placement in enumerate(t.placements):
        if not placement.is_replicate():  # Shard, and FSDP's _StridedShard on top of TP (not is_shard())
            count *= mesh.size(dim)
    return count


@torch.no_grad()
def clip_grad_norm_(parts: list, max_norm: float, stage_size: int, world_group=None, copy=None) -> float:
    """Scale every gradient by min(1, max_norm / (norm + 1e-6)) (as torch.nn.utils.clip_grad_norm_), with the
    norm over the whole model: each rank adds |its shard|^2 divided by the number of ranks of its pipeline stage
    holding that same shard, and the sum runs over the world; `copy`, a parameter that another stage also holds
    (the last stage's embedding), is scaled but not counted. Returns the norm (non-finite when a grad is)."""
    grads = [p.grad for p in parameters(parts) if p.grad is not None]
    device = _local(grads[0]).device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g in grads:
        if copy is not None and g is copy.grad:
            continue
        copies = stage_size / _distinct_shards(g)
        total += _local(g).double().pow(2).sum() / copies
    if world_group is not None or (dist.is_initialized() and dist.get_world_size() > 1):
        dist.all_reduce(total, group=world_group)
    norm = math.sqrt(float(total))
    if max_norm is not None and math.isfinite(max_norm) and math.isfinite(norm):
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                _local(g).mul_(coef)
    return norm
