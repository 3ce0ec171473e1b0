"""The hand-written block softmax behind context-parallel attention (cp_attention.py): matmul, masked scores, an
online softmax forward and a backward that recomputes each block's probabilities from the saved log-sum-exp.

It is the path on devices without a verified SDPA block kernel (CUDA until its efficient-attention call is checked
on a GPU) and the independent reference the SDPA path is benchmarked against (bench/bench_long_context.py
--kernels). Same layout as cp_attention.py: q (b, g, r, Lq, d) with g key/value heads of r queries each, keys and
values (b, g, S, d), `mask(q0, q1, k0, k1)` the (b, 1, 1, nq, nk) boolean of visible pairs, `plan` from block_plan.
"""

from __future__ import annotations

import torch


def accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp16/fp32 inputs, fp64 stays fp64


def _scores(qb, kb, scale, allowed):
    """(b, g, r, nq, nk) fp32 (fp64 for fp64 inputs) masked scores of query block qb (b, g, r, nq, d) against keys kb (b, g, nk, d)."""
    b, g, r, nq, d = qb.shape
    s = (
        torch.matmul(qb.reshape(b, g, r * nq, d), kb.transpose(-1, -2)).to(accumulation_dtype(qb)).view(b, g, r, nq, -1)
        * scale
    )
    return s.masked_fill(~allowed, float("-inf"))


def reference_attention_blocks(q, K, V, mask, plan: list, scale: float):
    """Forward: out (b, g, r, Lq, d) in q's dtype and lse (b, g, r, Lq) fp32 (fp64 for fp64 inputs), by an online softmax over blocks."""
    b, g, r, _, d = q.shape
    acc_dtype = accumulation_dtype(q)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=acc_dtype, device=q.device)
    for q0, q1, key_blocks in plan:
        qb = q[:, :, :, q0:q1]
        nq = q1 - q0
        best = torch.full((b, g, r, nq), float("-inf"), dtype=acc_dtype, device=q.device)
        total = torch.zeros(b, g, r, nq, dtype=acc_dtype, device=q.device)
        acc = torch.zeros(b, g, r, nq, d, dtype=acc_dtype, device=q.device)
        for k0, k1, _ in key_blocks:
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


def reference_attention_blocks_backward(q, K, V, out, grad_out, lse, mask, plan: list, scale: float):
    """dq (b, g, r, Lq, d), dK and dV (b, g, S, d), in fp32 (fp64 for fp64 inputs), recomputing every block's probabilities from lse."""
    b, g, r, _, d = q.shape
    acc = accumulation_dtype(q)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)  # (b, g, r, Lq): rowsum(dO * O)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dK = torch.zeros(K.shape, dtype=acc, device=q.device)
    dV = torch.zeros(V.shape, dtype=acc, device=q.device)
    for q0, q1, key_blocks in plan:
        nq = q1 - q0
        qb = q[:, :, :, q0:q1].reshape(b, g, r * nq, d).to(acc)
        dob = grad_out[:, :, :, q0:q1].reshape(b, g, r * nq, d).to(acc)
        lse_b, delta_b = lse[:, :, :, q0:q1, None], delta[:, :, :, q0:q1, None]
        for k0, k1, _ in key_blocks:
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
