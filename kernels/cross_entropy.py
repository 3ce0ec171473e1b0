"""lm_head matmul + cross-entropy over a large vocabulary, chunked over tokens.

Full fp32 logits for all tokens (N x 131072 x 4 bytes: 4 GiB at N = 8192) are never held: the forward
keeps only each token's logsumexp, and the backward recomputes one chunk of logits at a time, turns it
into d(loss)/d(logits) = softmax - onehot in place, and multiplies it back into the hidden and weight
gradients. The same function serves the main head and the MTP heads (they share the weight).
"""

from __future__ import annotations

import torch

from latentforge.kernels._dispatch import compute_dtype, use_triton

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref"]


def _check_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int, reduction: str
) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: hidden must be (N, H) and weight (V, H) with the same H, got "
            f"{tuple(hidden.shape)} and {tuple(weight.shape)} (flatten batch dims first)"
        )
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"linear_cross_entropy: labels must be ({hidden.shape[0]},), got {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _token_scale(grad_out: torch.Tensor, valid: torch.Tensor, reduction: str, n_valid: int) -> torch.Tensor:
    """d(reduced loss)/d(per-token loss), zero on ignored tokens."""
    if reduction == "none":
        return grad_out * valid
    scale = grad_out / max(n_valid, 1) if reduction == "mean" else grad_out
    return valid * scale


class _ChunkedLinearCE(torch.autograd.Function):
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
        cdt = compute_dtype(hidden, weight)
        N = hidden.shape[0]
        valid = labels != ignore_index
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
        # upcast the operands once (exact fp32 logits); only one chunk of logits exists at a time
        w = weight.to(cdt)
        lse = torch.empty(N, dtype=cdt, device=hidden.device)
        loss = torch.empty(N, dtype=cdt, device=hidden.device)
        for s in range(0, N, chunk_size):
            logits = hidden[s : s + chunk_size].to(cdt) @ w.t()
            lse[s : s + chunk_size] = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe_labels[s : s + chunk_size, None]).squeeze(1)
            loss[s : s + chunk_size] = lse[s : s + chunk_size] - target
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        n_valid = int(valid.sum())
        ctx.save_for_backward(hidden, weight, safe_labels, valid, lse)
        ctx.chunk_size, ctx.reduction, ctx.n_valid = chunk_size, reduction, n_valid
        if reduction == "none":
            return loss
        total = loss.sum()
        return total / max(n_valid, 1) if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, labels, valid, lse = ctx.saved_tensors
        cdt = lse.dtype
        scale = _token_scale(grad_out.to(cdt), valid.to(cdt), ctx.reduction, ctx.n_valid)
        w = weight.to(cdt)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=cdt, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[s : s + ctx.chunk_size].to(cdt)
            logits = h @ w.t()
            grad_logits = torch.exp(logits - lse[s : s + ctx.chunk_size, None])  # softmax
            rows = torch.arange(h.shape[0], device=h.device)
            grad_logits[rows, labels[s : s + ctx.chunk_size]] -= 1.0
            grad_logits *= scale[s : s + ctx.chunk_size, None]
            if grad_hidden is not None:
                grad_hidden[s : s + ctx.chunk_size] = (grad_logits @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.t() @ h
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    reduction: str = "mean",
) -> torch.Tensor:
    """CE(hidden @ weight.T, labels) in fp32, chunked; returns a scalar ("mean" over non-ignored tokens,
    0 when all are ignored; or "sum") or per-token losses (N,) for "none" (0 where ignored)."""
    _check_inputs(hidden, weight, labels, chunk_size, reduction)
    return _ChunkedLinearCE.apply(hidden, weight, labels, ignore_index, chunk_size, reduction)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int = 4096,
    reduction: str = "mean",
) -> torch.Tensor:
    """Chunked fused lm_head + CE: Triton softmax/gradient kernels around cuBLAS GEMMs on CUDA, else the ref.

    Always fp32 logits, also under torch.autocast: autocast would run the forward's GEMM in bf16 while the custom
    backward recomputes in fp32, and the two would disagree."""
    _check_inputs(hidden, weight, labels, chunk_size, reduction)
    with torch.autocast(hidden.device.type, enabled=False):
        if use_triton(hidden, weight):
            from latentforge.kernels.cross_entropy_triton import linear_cross_entropy_triton

            return linear_cross_entropy_triton(
                hidden, weight, labels, ignore_index=ignore_index, chunk_size=chunk_size, reduction=reduction
            )
        return _ChunkedLinearCE.apply(hidden, weight, labels, ignore_index, chunk_size, reduction)
