"""Context-parallel attention in O(s/cp) saved memory per rank: keys/values consumed block by block with an
online softmax, masks built per block from global positions and document ids, and a backward that recomputes
each block's scores from the saved log-sum-exp (no score matrix of the whole sequence is ever kept).

Why an all-gather of K/V rather than a ring of send/recv: the communication volume is the same. Per rank and per
layer a ring moves (cp-1)/cp * S * 2 * kv_heads * head_dim elements forward (K and V pass every rank once) and the
same again for dK/dV in the backward; the all-gather moves exactly that forward and the reduce-scatter of dK/dV
exactly that backward (plus a second all-gather, as a ring backward also re-sends K/V). One collective per tensor
runs at bus bandwidth with no hand-written overlap, and with grouped-query attention K/V are small next to the
queries (Nemotron 3 Super: 2 KV heads x 128 = 512 bytes per token for K and V in bf16, 0.5 GiB at 1M tokens). The
gathered K/V are transient: only this rank's K/V shard, its queries, output and log-sum-exp are saved for the
backward, which gathers K/V again. What the ring would save is that transient (S instead of 2S/cp K/V rows alive
during one layer's attention), which the plan (train/parallel/memory.py) counts.

Per query block only key blocks that can be visible (first key position <= last query position) are computed, so
with the load-balanced token order (token_order.py) every rank does the same work.
"""

from __future__ import annotations

import math

import torch

from .collectives import _all_gather, _reduce_scatter, _size

DEFAULT_BLOCK = 1024


def block_plan(q_pos: torch.Tensor, k_pos: torch.Tensor, block: int = DEFAULT_BLOCK) -> list:
    """[(q0, q1, [(k0, k1), ...]), ...]: the key blocks each query block must visit (causally visible at all).

    Computed once per micro-batch on the CPU from the position vectors (no device synchronisation per layer)."""
    q_pos, k_pos = q_pos.cpu(), k_pos.cpu()
    k_blocks = [(k0, min(k0 + block, len(k_pos))) for k0 in range(0, len(k_pos), block)]
    k_first = [int(k_pos[k0:k1].min()) for k0, k1 in k_blocks]
    plan = []
    for q0 in range(0, len(q_pos), block):
        q1 = min(q0 + block, len(q_pos))
        last = int(q_pos[q0:q1].max())
        plan.append((q0, q1, [kb for kb, first in zip(k_blocks, k_first) if first <= last]))
    return plan


class _BlockMask:
    """Which (query, key) pairs are allowed: key position <= query position and the same document."""

    def __init__(self, q_pos, k_pos, q_doc, k_doc):
        self.q_pos, self.k_pos, self.q_doc, self.k_doc = q_pos, k_pos, q_doc, k_doc

    def __call__(self, q0, q1, k0, k1) -> torch.Tensor:
        causal = self.k_pos[None, k0:k1] <= self.q_pos[q0:q1, None]
        same_doc = self.q_doc[:, q0:q1, None] == self.k_doc[:, None, k0:k1]
        return (causal[None] & same_doc)[:, None, None]  # (b, 1, 1, nq, nk): broadcast over kv groups, repeats


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp16/fp32 inputs, fp64 stays fp64


def _scores(qb, kb, scale, allowed):
    """(b, g, r, nq, nk) fp32 (fp64 for fp64 inputs) masked scores of query block qb (b, g, r, nq, d) against keys kb (b, g, nk, d)."""
    b, g, r, nq, d = qb.shape
    s = (
        torch.matmul(qb.reshape(b, g, r * nq, d), kb.transpose(-1, -2))
        .to(_accumulation_dtype(qb))
        .view(b, g, r, nq, -1)
        * scale
    )
    return s.masked_fill(~allowed, float("-inf"))


def attention_blocks(q, K, V, mask: _BlockMask, plan: list, scale: float):
    """Forward: out (b, g, r, Lq, d) in q's dtype and lse (b, g, r, Lq) fp32 (fp64 for fp64 inputs), by an online softmax over blocks."""
    b, g, r, _, d = q.shape
    acc_dtype = _accumulation_dtype(q)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=acc_dtype, device=q.device)
    for q0, q1, key_blocks in plan:
        qb = q[:, :, :, q0:q1]
        nq = q1 - q0
        best = torch.full((b, g, r, nq), float("-inf"), dtype=acc_dtype, device=q.device)
        total = torch.zeros(b, g, r, nq, dtype=acc_dtype, device=q.device)
        acc = torch.zeros(b, g, r, nq, d, dtype=acc_dtype, device=q.device)
        for k0, k1 in key_blocks:
            s = _scores(qb, K[:, :, k0:k1], scale, mask(q0, q1, k0, k1))
            new_best = torch.maximum(best, s.amax(-1))
            shift = new_best.masked_fill(new_best == float("-inf"), 0.0)  # rows with nothing visible yet
            p = torch.exp(s - shift[..., None])
            rescale = torch.exp(best - shift)
            total = total * rescale + p.sum(-1)
            pv = torch.matmul(p.view(b, g, r * nq, -1).to(V.dtype), V[:, :, k0:k1]).to(acc_dtype).view(b, g, r, nq, d)
            acc = acc * rescale[..., None] + pv
            best = new_best
        out[:, :, :, q0:q1] = (acc / total[..., None]).to(q.dtype)
        lse[:, :, :, q0:q1] = best + torch.log(total)  # every query sees itself: total > 0, best finite
    return out, lse


def attention_blocks_backward(q, K, V, out, grad_out, lse, mask: _BlockMask, plan: list, scale: float):
    """dq (b, g, r, Lq, d), dK and dV (b, g, S, d), in fp32 (fp64 for fp64 inputs), recomputing every block's probabilities from lse."""
    b, g, r, _, d = q.shape
    acc = _accumulation_dtype(q)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)  # (b, g, r, Lq): rowsum(dO * O)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dK = torch.zeros(K.shape, dtype=acc, device=q.device)
    dV = torch.zeros(V.shape, dtype=acc, device=q.device)
    for q0, q1, key_blocks in plan:
        nq = q1 - q0
        qb = q[:, :, :, q0:q1].reshape(b, g, r * nq, d).to(acc)
        dob = grad_out[:, :, :, q0:q1].reshape(b, g, r * nq, d).to(acc)
        lse_b, delta_b = lse[:, :, :, q0:q1, None], delta[:, :, :, q0:q1, None]
        for k0, k1 in key_blocks:
            kb, vb = K[:, :, k0:k1].to(acc), V[:, :, k0:k1].to(acc)
            s = _scores(qb.view(b, g, r, nq, d), kb, scale, mask(q0, q1, k0, k1))
            p = torch.exp(s - lse_b)  # masked entries: exp(-inf) = 0
            p_flat = p.view(b, g, r * nq, -1)
            dV[:, :, k0:k1] += torch.matmul(p_flat.transpose(-1, -2), dob)
            dp = torch.matmul(dob, vb.transpose(-1, -2)).view(p.shape)
            ds = (p * (dp - delta_b) * scale).view(b, g, r * nq, -1)
            dq[:, :, :, q0:q1] += torch.matmul(ds, kb).view(b, g, r, nq, d)
            dK[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb)
    return dq, dK, dV


def _gather_keys(x, group):
    return x if _size(group) == 1 else _all_gather(x, 2, group)


def _scatter_key_grads(x, group):
    return x if _size(group) == 1 else _reduce_scatter(x, 2, group)


class _ContextAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, plan, group):
        scale = 1.0 / math.sqrt(q.shape[-1])
        K, V = _gather_keys(k, group), _gather_keys(v, group)
        out, lse = attention_blocks(q, K, V, mask, plan, scale)
        ctx.save_for_backward(q, k, v, out, lse)  # this rank's shard only: K, V are gathered again
        ctx.mask, ctx.plan, ctx.group, ctx.scale = mask, plan, group, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        K, V = _gather_keys(k, ctx.group), _gather_keys(v, ctx.group)
        dq, dK, dV = attention_blocks_backward(q, K, V, out, grad_out, lse, ctx.mask, ctx.plan, ctx.scale)
        del K, V
        dk, dv = _scatter_key_grads(dK, ctx.group), _scatter_key_grads(dV, ctx.group)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def context_attention(q, k, v, q_pos, k_pos, q_doc, k_doc, group, plan=None, block: int = DEFAULT_BLOCK):
    """Causal, document-masked grouped-query attention of this rank's queries against every CP rank's keys.

    q (b, heads, Lq, d); k, v (b, kv_heads, Lk, d) this rank's shard; q_pos (Lq,) and q_doc (b, Lq) the queries'
    global positions and document ids; k_pos (S,) and k_doc (b, S) those of the keys of all ranks in rank order
    (what an all-gather over `group` returns; with `group` None or of one rank, S = Lk). Returns (b, heads, Lq, d).
    """
    b, heads, length, d = q.shape
    groups = k.shape[1]
    if heads % groups:
        raise ValueError(f"context_attention: {heads} query heads are not a multiple of {groups} key/value heads")
    expected = k.shape[2] * _size(group)
    if k_pos.shape[0] != expected or k_doc.shape[-1] != expected:
        raise ValueError(f"context_attention: {k_pos.shape[0]} key positions for {expected} gathered keys")
    if plan is None:
        plan = block_plan(q_pos, k_pos, block)
    mask = _BlockMask(q_pos, k_pos, q_doc, k_doc)
    q5 = q.view(b, groups, heads // groups, length, d)
    return _ContextAttention.apply(q5, k, v, mask, plan, group).view(b, heads, length, d)
