"""Chunked lm_head + cross-entropy: cuBLAS GEMMs for the matmuls, Triton for the softmax parts.

Per chunk of tokens the forward computes fp32 logits (bf16 operands, fp32 accumulation and output),
and one Triton program per token reduces its row to logsumexp and the loss; only (N,) floats survive
the chunk. The backward recomputes the chunk's logits, a Triton program per token writes
(softmax - onehot) * dloss into a buffer in the hidden dtype, and two GEMMs give d(hidden) and the
chunk's share of d(weight) (accumulated in fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from latentforge.kernels.triton_launch import launch


@triton.jit
def _lse_loss_kernel(LOGITS, LABELS, LSE, LOSS, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = LOGITS + row.to(tl.int64) * V
    m = tl.zeros((), dtype=tl.float32) - float("inf")  # typed, so the loop-carried values keep one type
    s = tl.zeros((), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(LSE + row, lse)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))


@triton.jit
def _softmax_grad_kernel(LOGITS, LABELS, LSE, SCALE, DLOGITS, V, ignore_index, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    base = row.to(tl.int64) * V
    label = tl.load(LABELS + row)
    scale = tl.load(SCALE + row)
    scale = tl.where(label != ignore_index, scale, 0.0)
    lse = tl.load(LSE + row)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(LOGITS + base + cols, mask=cols < V, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(DLOGITS + base + cols, (g * scale).to(DLOGITS.dtype.element_ty), mask=cols < V)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output; for bf16/fp16 operands the GEMM accumulates in fp32 (no fp32 copies)."""
    if a.dtype == torch.float32:
        return a @ b
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):  # older torch, or no such kernel on this device
        return (a @ b).float()


def _block_v(V: int) -> int:
    return min(4096, triton.next_power_of_2(V))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        chunk_size: int,
        reduction: str,
    ) -> torch.Tensor:
        N, V = hidden.shape[0], weight.shape[0]
        labels = labels.contiguous()
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        loss = torch.empty(N, dtype=torch.float32, device=hidden.device)
        for s in range(0, N, chunk_size):
            e = min(N, s + chunk_size)
            logits = _mm_f32(hidden[s:e], weight.t())
            launch(_lse_loss_kernel, (e - s,))(
                logits, labels[s:e], lse[s:e], loss[s:e], V, ignore_index, BLOCK_V=_block_v(V)
            )
            del logits
        n_valid = int((labels != ignore_index).sum())
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index, ctx.chunk_size, ctx.reduction, ctx.n_valid = ignore_index, chunk_size, reduction, n_valid
        if reduction == "none":
            return loss
        total = loss.sum()
        return total / max(n_valid, 1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, lse = ctx.saved_tensors
        N, V = hidden.shape[0], weight.shape[0]
        grad_out = grad_out.float()
        if ctx.reduction == "none":
            scale = grad_out.contiguous()
        else:
            per_token = grad_out / max(ctx.n_valid, 1) if ctx.reduction == "mean" else grad_out
            scale = per_token.expand(N).contiguous()
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        for s in range(0, N, ctx.chunk_size):
            e = min(N, s + ctx.chunk_size)
            h = hidden[s:e]
            logits = _mm_f32(h, weight.t())
            dlogits = torch.empty(e - s, V, dtype=hidden.dtype, device=hidden.device)
            launch(_softmax_grad_kernel, (e - s,))(
                logits, labels[s:e], lse[s:e], scale[s:e], dlogits, V, ctx.ignore_index, BLOCK_V=_block_v(V)
            )
            del logits
            if grad_hidden is not None:
                grad_hidden[s:e] = dlogits @ weight
            if ctx.needs_input_grad[1]:
                part = _mm_f32(dlogits.t(), h)
                grad_weight = part if grad_weight is None else grad_weight.add_(part)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    reduction: str = "mean",
) -> torch.Tensor:
    return _LinearCrossEntropy.apply(hidden, weight, labels, ignore_index, chunk_size, reduction)
