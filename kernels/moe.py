"""Dropless MoE expert computation: permute tokens by expert, grouped squared-ReLU MLP, unpermute.

Layout of the permuted buffer: the (token, slot) assignments sorted by expert (stable, so tokens keep
their order inside an expert), each expert's rows padded with zero rows up to a multiple of ``alignment``
(16 / 32 / 128 for the FP8 / MXFP8 / NVFP4 GEMMs). Padding rows carry routing weight 0, so they
contribute nothing forward and receive no gradient.

    moe_permute   -> x_sorted (R, d), MoEPermState
    grouped_mlp   -> y_sorted (R, d):  y = down_e( relu(up_e(x))^2 * row_weight )
    moe_unpermute -> y (T, d):         y[t] = sum_j w[t, j] * y_sorted[row(t, j)]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from latentforge.kernels._dispatch import compute_dtype, use_triton

__all__ = [
    "MoEPermState",
    "moe_permute",
    "moe_permute_ref",
    "grouped_mlp",
    "grouped_mlp_ref",
    "moe_unpermute",
    "moe_unpermute_ref",
    "moe_experts",
    "moe_experts_ref",
    "moe_experts_dense",
    "moe_experts_gathered",
]

LinearFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class MoEPermState:
    """What moe_unpermute needs to invert moe_permute (and what load balancing reads)."""

    tokens_per_expert: torch.Tensor  # (E,) long: real assignments per expert (the expert load)
    tokens_per_expert_padded: torch.Tensor  # (E,) long: rows per expert in x_sorted, multiples of alignment
    expert_offsets: torch.Tensor  # (E + 1,) long: first row of each expert in x_sorted, then the total
    row_of_assignment: torch.Tensor  # (T, k) long: row of x_sorted holding token t's j-th choice
    num_tokens: int
    num_rows: int


def _check_routing(
    x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, alignment: int, values: bool = True
) -> None:
    """Shapes, and (`values`) the expert ids' range: a device sync, which the few-token paths skip (their indexing
    rejects an id out of range by itself)."""
    if x.dim() != 2:
        raise ValueError(f"moe_permute: x must be (tokens, hidden), got shape {tuple(x.shape)} (flatten batch dims)")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(
            f"moe_permute: topk_idx must be (tokens, k) with tokens = {x.shape[0]}, got {tuple(topk_idx.shape)}"
        )
    if alignment < 1:
        raise ValueError(f"moe_permute: alignment must be >= 1, got {alignment}")
    if values and topk_idx.numel() and (int(topk_idx.min()) < 0 or int(topk_idx.max()) >= num_experts):
        raise ValueError(
            f"moe_permute: topk_idx values must lie in [0, {num_experts}), got "
            f"[{int(topk_idx.min())}, {int(topk_idx.max())}]"
        )


def _routing_plan(topk_idx: torch.Tensor, num_experts: int, alignment: int) -> MoEPermState:
    """Destination row of every assignment (index bookkeeping only, no gradients involved)."""
    T, k = topk_idx.shape
    experts = topk_idx.reshape(-1).long()
    counts = torch.bincount(experts, minlength=num_experts)
    padded = (counts + alignment - 1) // alignment * alignment
    offsets = torch.zeros(num_experts + 1, dtype=torch.long, device=topk_idx.device)
    torch.cumsum(padded, 0, out=offsets[1:])
    order = torch.sort(experts, stable=True).indices  # assignments grouped by expert, token order kept
    sorted_experts = experts[order]
    unpadded_start = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(T * k, device=topk_idx.device) - unpadded_start[sorted_experts]
    rows = torch.empty_like(order)
    rows[order] = offsets[sorted_experts] + rank_in_expert
    return MoEPermState(counts, padded, offsets, rows.view(T, k), T, int(offsets[-1]))


def moe_permute_ref(
    x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, alignment: int = 1
) -> tuple[torch.Tensor, MoEPermState]:
    """Copy each token once per chosen expert into expert-sorted, alignment-padded rows (differentiable in x)."""
    _check_routing(x, topk_idx, num_experts, alignment)
    state = _routing_plan(topk_idx, num_experts, alignment)
    k = topk_idx.shape[1]
    token_of_assignment = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)
    x_sorted = x.new_zeros(state.num_rows, x.shape[1]).index_copy(
        0, state.row_of_assignment.reshape(-1), x[token_of_assignment]
    )
    return x_sorted, state


def _check_mlp(
    x_sorted: torch.Tensor,
    tokens_per_expert_padded: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    row_weight: torch.Tensor | None,
) -> None:
    E, I, d = w_up.shape
    if w_down.shape != (E, d, I):
        raise ValueError(
            f"grouped_mlp: w_down must be (E, d, I) = {(E, d, I)} given w_up {tuple(w_up.shape)}, "
            f"got {tuple(w_down.shape)}"
        )
    if x_sorted.dim() != 2 or x_sorted.shape[1] != d:
        raise ValueError(f"grouped_mlp: x_sorted must be (rows, {d}), got {tuple(x_sorted.shape)}")
    if tokens_per_expert_padded.shape != (E,):
        raise ValueError(
            f"grouped_mlp: tokens_per_expert_padded must be ({E},), got {tuple(tokens_per_expert_padded.shape)}"
        )
    if row_weight is not None and row_weight.shape != (x_sorted.shape[0],):
        raise ValueError(f"grouped_mlp: row_weight must be ({x_sorted.shape[0]},), got {tuple(row_weight.shape)}")


def _squared_relu_weighted(h: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
    cdt = compute_dtype(h, row_weight)
    a = torch.relu(h.to(cdt)).square()
    if row_weight is not None:
        a = a * row_weight.to(cdt).unsqueeze(-1)
    return a.to(h.dtype)


def grouped_mlp_ref(
    x_sorted: torch.Tensor,
    tokens_per_expert_padded: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    linear_fn: LinearFn | None = None,
) -> torch.Tensor:
    """One expert at a time: y_e = linear(relu(linear(x_e, up_e))^2 * row_weight, down_e)."""
    _check_mlp(x_sorted, tokens_per_expert_padded, w_up, w_down, row_weight)
    linear = linear_fn if linear_fn is not None else (lambda a, w: a @ w.t())
    outputs = []
    start = 0
    for e, rows in enumerate(tokens_per_expert_padded.tolist()):
        xe = x_sorted[start : start + rows]
        we = row_weight[start : start + rows] if row_weight is not None else None
        outputs.append(linear(_squared_relu_weighted(linear(xe, w_up[e]), we), w_down[e]))
        start += rows
    if start != x_sorted.shape[0]:
        raise ValueError(
            f"grouped_mlp: tokens_per_expert_padded sums to {start}, x_sorted has {x_sorted.shape[0]} rows"
        )
    if not outputs:
        return x_sorted.new_zeros(0, w_down.shape[1])
    return torch.cat(outputs, 0)


def moe_unpermute_ref(
    y_sorted: torch.Tensor, perm_state: MoEPermState, topk_weight: torch.Tensor | None
) -> torch.Tensor:
    """y[t] = sum_j w[t, j] * y_sorted[row(t, j)], summed in fp32; ``topk_weight=None`` means weights of 1
    (use it when the weights were already applied as grouped_mlp's row_weight)."""
    T, k = perm_state.row_of_assignment.shape
    cdt = compute_dtype(y_sorted, topk_weight)
    gathered = y_sorted[perm_state.row_of_assignment.reshape(-1)].view(T, k, -1).to(cdt)
    if topk_weight is not None:
        if topk_weight.shape != (T, k):
            raise ValueError(f"moe_unpermute: topk_weight must be {(T, k)}, got {tuple(topk_weight.shape)}")
        gathered = gathered * topk_weight.to(cdt).unsqueeze(-1)
    return gathered.sum(1).to(y_sorted.dtype)


def row_weights(perm_state: MoEPermState, topk_weight: torch.Tensor) -> torch.Tensor:
    """Routing weight of every permuted row (0 on padding rows), differentiable in topk_weight."""
    return topk_weight.new_zeros(perm_state.num_rows).index_copy(
        0, perm_state.row_of_assignment.reshape(-1), topk_weight.reshape(-1)
    )


def moe_experts_ref(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    alignment: int = 1,
    linear_fn: LinearFn | None = None,
) -> torch.Tensor:
    x_sorted, state = moe_permute_ref(x, topk_idx, w_up.shape[0], alignment)
    y_sorted = grouped_mlp_ref(
        x_sorted, state.tokens_per_expert_padded, w_up, w_down, row_weights(state, topk_weight), linear_fn
    )
    return moe_unpermute_ref(y_sorted, state, None)


# ----------------------------------------------------------------------------------------------------------
# few tokens without gradient (decoding, draft verification): the grouped path costs a GEMM (a launch on GPU) per
# expert. Below these sizes it is cheaper to run every expert on every token (routing weight 0 for the experts a
# token did not choose: a handful of GEMMs for a tiny model) or to gather each token's chosen experts' weights.
DENSE_EXPERTS_MAX_MACS = 1 << 24
GATHER_EXPERTS_MAX_ELEMENTS = 1 << 22


def moe_experts_dense(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Every expert on every token, weighted by the routing weight (0 where not chosen); (T, d) -> (T, d)."""
    E, I, d = w_up.shape
    T = x.shape[0]
    cdt = compute_dtype(x, topk_weight, w_up, w_down)
    h = torch.matmul(x, w_up.reshape(E * I, d).t()).view(T, E, I)
    weight = torch.zeros(T, E, dtype=cdt, device=x.device).scatter_add_(1, topk_idx.long(), topk_weight.to(cdt))
    h = (torch.relu(h.to(cdt)).square() * weight[..., None]).to(x.dtype)
    y = torch.bmm(h.transpose(0, 1), w_down.transpose(1, 2))  # (E, T, d)
    return y.to(cdt).sum(0).to(x.dtype)


def moe_experts_gathered(
    x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
) -> torch.Tensor:
    """Each token through its k chosen experts, their weights gathered per token; (T, d) -> (T, d)."""
    cdt = compute_dtype(x, topk_weight, w_up, w_down)
    h = torch.matmul(w_up[topk_idx], x[:, None, :, None]).squeeze(-1)  # (T, k, I)
    h = (torch.relu(h.to(cdt)).square() * topk_weight.to(cdt)[..., None]).to(x.dtype)
    y = torch.matmul(w_down[topk_idx], h[..., None]).squeeze(-1)  # (T, k, d)
    return y.to(cdt).sum(1).to(x.dtype)


def _few_token_path(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    linear_fn: LinearFn | None,
) -> Callable[..., torch.Tensor] | None:
    """moe_experts_dense / moe_experts_gathered where they are cheaper and allowed, else None."""
    if linear_fn is not None:  # precision emulation: every GEMM goes through it
        return None
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weight, w_up, w_down)):
        return None  # training: the grouped path's memory does not grow with the number of experts
    E, I, d = w_up.shape
    T, k = topk_idx.shape
    if T * E * I * d <= DENSE_EXPERTS_MAX_MACS:
        return moe_experts_dense
    if T * k * I * d <= GATHER_EXPERTS_MAX_ELEMENTS:
        return moe_experts_gathered
    return None


# ----------------------------------------------------------------------------------------------------------
# dispatchers


def moe_permute(
    x: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, alignment: int = 1
) -> tuple[torch.Tensor, MoEPermState]:
    """Permute tokens by expert with padding to ``alignment``; Triton gather/scatter on CUDA."""
    if use_triton(x, topk_idx):
        from latentforge.kernels.moe_triton import moe_permute_triton

        _check_routing(x, topk_idx, num_experts, alignment)
        state = _routing_plan(topk_idx, num_experts, alignment)
        return moe_permute_triton(x, state), state
    return moe_permute_ref(x, topk_idx, num_experts, alignment)


def grouped_mlp(
    x_sorted: torch.Tensor,
    tokens_per_expert_padded: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    row_weight: torch.Tensor | None = None,
    linear_fn: LinearFn | None = None,
) -> torch.Tensor:
    """Grouped squared-ReLU expert MLP. ``linear_fn`` (precision emulation) forces the reference path."""
    if linear_fn is None and use_triton(x_sorted, w_up, w_down):
        from latentforge.kernels.moe_triton import grouped_mlp_triton

        _check_mlp(x_sorted, tokens_per_expert_padded, w_up, w_down, row_weight)
        return grouped_mlp_triton(x_sorted, tokens_per_expert_padded, w_up, w_down, row_weight)
    return grouped_mlp_ref(x_sorted, tokens_per_expert_padded, w_up, w_down, row_weight, linear_fn)


def moe_unpermute(y_sorted: torch.Tensor, perm_state: MoEPermState, topk_weight: torch.Tensor | None) -> torch.Tensor:
    """Weighted sum of each token's expert outputs; Triton gather-reduce on CUDA."""
    if use_triton(y_sorted):
        from latentforge.kernels.moe_triton import moe_unpermute_triton

        return moe_unpermute_triton(y_sorted, perm_state, topk_weight)
    return moe_unpermute_ref(y_sorted, perm_state, topk_weight)


def moe_experts(
    x: torch.Tensor,
    topk_idx: torch.Tensor,
    topk_weight: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    alignment: int = 1,
    linear_fn: LinearFn | None = None,
) -> torch.Tensor:
    """Routed experts end to end: permute, grouped MLP with the routing weight fused, unpermute (sum). Without
    gradient, few tokens take :func:`moe_experts_dense` or :func:`moe_experts_gathered` (same math)."""
    few_tokens = _few_token_path(x, topk_idx, topk_weight, w_up, w_down, linear_fn)
    if few_tokens is not None:
        _check_routing(x, topk_idx, w_up.shape[0], alignment, values=False)
        return few_tokens(x, topk_idx, topk_weight, w_up, w_down)
    x_sorted, state = moe_permute(x, topk_idx, w_up.shape[0], alignment)
    y_sorted = grouped_mlp(
        x_sorted, state.tokens_per_expert_padded, w_up, w_down, row_weights(state, topk_weight), linear_fn
    )
    return moe_unpermute(y_sorted, state, None)
