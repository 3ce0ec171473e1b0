"""Triton causal depthwise conv1d (+ bias + SiLU) with seq_idx resets and an initial state.

Tiles are (BLOCK_T tokens x BLOCK_C channels) of the channels-last input, so loads are contiguous in
channels. The k taps are unrolled; an input from another document, or before the row start without an
initial state, reads as zero.
Backward: kernel 1 recomputes the pre-activation, forms dacc = dy * silu'(acc) and the per-tile partial
sums of dweight / dbias; kernel 2 is the transposed conv of dacc (dx). The final state (the last k-1
inputs) is a few torch indexing ops outside the autograd Function, so autograd routes its gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from latentforge.kernels.triton_launch import launch


@triton.jit
def _tap_input(
    X, INIT, SEQ, b, s, t_ok, c, c_ok, doc_t, L, C, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, K: tl.constexpr
):
    """Input at times s (BLOCK_T,) seen from tokens whose doc is doc_t: x, the initial state, or 0."""
    m = t_ok[:, None] & c_ok[None, :]
    v = tl.load(X + b * L * C + s[:, None] * C + c[None, :], mask=m & (s[:, None] >= 0), other=0.0).to(tl.float32)
    if HAS_INIT:
        v += tl.load(
            INIT + b * C * (K - 1) + c[None, :] * (K - 1) + (K - 1 + s)[:, None], mask=m & (s[:, None] < 0), other=0.0
        ).to(tl.float32)
    if HAS_SEQ:
        doc_s = tl.load(SEQ + b * L + tl.maximum(s, 0), mask=t_ok, other=0)
        v = tl.where((doc_s == doc_t)[:, None], v, 0.0)
    return v


@triton.jit
def _conv_fwd_kernel(
    X,
    W,
    BIAS,
    INIT,
    SEQ,
    Y,
    DY,
    DACC,
    DW_PART,
    DB_PART,
    L,
    C,
    HAS_BIAS: tl.constexpr,
    HAS_INIT: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    SILU: tl.constexpr,
    BACKWARD: tl.constexpr,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    t = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # 64-bit offsets: L * C passes 2^31 at 1M tokens
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    t_ok, c_ok = t < L, c < C
    m = t_ok[:, None] & c_ok[None, :]
    doc_t = tl.load(SEQ + b * L + t, mask=t_ok, other=0) if HAS_SEQ else t * 0
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(K):  # pyright: ignore[reportGeneralTypeIssues]  (iterable only inside @triton.jit)
        v = _tap_input(X, INIT, SEQ, b, t - (K - 1) + i, t_ok, c, c_ok, doc_t, L, C, HAS_INIT, HAS_SEQ, K)
        acc += v * tl.load(W + c * K + i, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if not BACKWARD:
        out = acc * tl.sigmoid(acc) if SILU else acc
        tl.store(Y + b * L * C + t[:, None] * C + c[None, :], out.to(Y.dtype.element_ty), mask=m)
    else:
        dacc = tl.load(DY + b * L * C + t[:, None] * C + c[None, :], mask=m, other=0.0).to(tl.float32)
        if SILU:
            sig = tl.sigmoid(acc)
            dacc = dacc * sig * (1.0 + acc * (1.0 - sig))
        tl.store(DACC + b * L * C + t[:, None] * C + c[None, :], dacc, mask=m)
        part = b * tl.num_programs(0) + pid_t
        tl.store(DB_PART + part * C + c, tl.sum(dacc, axis=0), mask=c_ok)
        for i in tl.static_range(K):  # pyright: ignore[reportGeneralTypeIssues]  (iterable only inside @triton.jit)
            v = _tap_input(X, INIT, SEQ, b, t - (K - 1) + i, t_ok, c, c_ok, doc_t, L, C, HAS_INIT, HAS_SEQ, K)
            tl.store(DW_PART + part * C * K + c * K + i, tl.sum(dacc * v, axis=0), mask=c_ok)


@triton.jit
def _conv_dx_kernel(
    DACC,
    W,
    SEQ,
    DX,
    L,
    C,
    HAS_SEQ: tl.constexpr,
    K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # dx[s] = sum_i w_i * dacc[s + K-1-i], when that token is in s's document
    pid_t, pid_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    s = (pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    s_ok, c_ok = s < L, c < C
    doc_s = tl.load(SEQ + b * L + s, mask=s_ok, other=0) if HAS_SEQ else s * 0
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    for i in tl.static_range(K):  # pyright: ignore[reportGeneralTypeIssues]  (iterable only inside @triton.jit)
        t = s + (K - 1) - i
        t_ok = t < L
        d = tl.load(
            DACC + b * L * C + t[:, None] * C + c[None, :], mask=(t_ok & s_ok)[:, None] & c_ok[None, :], other=0.0
        )
        if HAS_SEQ:
            doc_t = tl.load(SEQ + b * L + t, mask=t_ok & s_ok, other=0)
            d = tl.where((doc_t == doc_s)[:, None], d, 0.0)
        acc += d * tl.load(W + c * K + i, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        DX + b * L * C + s[:, None] * C + c[None, :], acc.to(DX.dtype.element_ty), mask=s_ok[:, None] & c_ok[None, :]
    )


NUM_WARPS = {"_conv_fwd_kernel": 8, "_conv_dx_kernel": 4}  # no register spills on sm_90 at these tiles


def _blocks(L: int, C: int) -> tuple[int, int, tuple[int, int]]:
    block_c = min(64, triton.next_power_of_2(C))
    block_t = min(32, triton.next_power_of_2(L))
    return block_t, block_c, (triton.cdiv(L, block_t), triton.cdiv(C, block_c))


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        seq_idx: torch.Tensor | None,
        initial_state: torch.Tensor | None,
        silu: bool,
    ) -> torch.Tensor:
        b, L, C = x.shape
        K = weight.shape[1]
        x = x.contiguous()
        weight = weight.contiguous()
        seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        init = initial_state.contiguous() if initial_state is not None else None
        y = torch.empty_like(x)
        bt, bc, (nt, nc) = _blocks(L, C)
        launch(_conv_fwd_kernel, (nt, nc, b))(
            x,
            weight,
            bias if bias is not None else weight,
            init if init is not None else x,
            seq if seq is not None else x,
            y,
            x,
            x,
            x,
            x,
            L,
            C,
            HAS_BIAS=bias is not None,
            HAS_INIT=init is not None,
            HAS_SEQ=seq is not None,
            SILU=silu,
            BACKWARD=False,
            K=K,
            BLOCK_T=bt,
            BLOCK_C=bc,
            num_warps=NUM_WARPS["_conv_fwd_kernel"],
        )
        ctx.save_for_backward(x, weight, bias, seq, init)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, bias, seq, init = ctx.saved_tensors
        b, L, C = x.shape
        K = weight.shape[1]
        dy = dy.contiguous()
        bt, bc, (nt, nc) = _blocks(L, C)
        dacc = torch.empty(b, L, C, dtype=torch.float32, device=x.device)
        dw_part = torch.empty(b * nt, C, K, dtype=torch.float32, device=x.device)
        db_part = torch.empty(b * nt, C, dtype=torch.float32, device=x.device)
        launch(_conv_fwd_kernel, (nt, nc, b))(
            x,
            weight,
            bias if bias is not None else weight,
            init if init is not None else x,
            seq if seq is not None else x,
            x,
            dy,
            dacc,
            dw_part,
            db_part,
            L,
            C,
            HAS_BIAS=bias is not None,
            HAS_INIT=init is not None,
            HAS_SEQ=seq is not None,
            SILU=ctx.silu,
            BACKWARD=True,
            K=K,
            BLOCK_T=bt,
            BLOCK_C=bc,
            num_warps=NUM_WARPS["_conv_fwd_kernel"],
        )
        dx = torch.empty_like(x)
        launch(_conv_dx_kernel, (nt, nc, b))(
            dacc,
            weight,
            seq if seq is not None else x,
            dx,
            L,
            C,
            HAS_SEQ=seq is not None,
            K=K,
            BLOCK_T=bt,
            BLOCK_C=bc,
            num_warps=NUM_WARPS["_conv_dx_kernel"],
        )
        dinit = None
        if init is not None and ctx.needs_input_grad[4]:
            dinit = _initial_state_grad(dacc, weight, seq, K).to(init.dtype)
        dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dx, dw_part.sum(0).to(weight.dtype), dbias, None, dinit, None


def _initial_state_grad(dacc: torch.Tensor, weight: torch.Tensor, seq: torch.Tensor | None, K: int) -> torch.Tensor:
    # the k-1 history slots s = -(K-1)..-1 feed tokens t = s + K-1-i < K-1: a handful of tiny ops
    b, L, C = dacc.shape
    dinit = torch.zeros(b, C, K - 1, dtype=torch.float32, device=dacc.device)
    for slot in range(K - 1):
        s = slot - (K - 1)
        for i in range(K):
            t = s + (K - 1) - i
            if 0 <= t < L:
                d = dacc[:, t]
                if seq is not None:
                    d = d * (seq[:, t] == seq[:, 0]).unsqueeze(-1)
                dinit[:, :, slot] += d * weight[:, i].float()
    return dinit


def _final_state(
    x: torch.Tensor, seq_idx: torch.Tensor | None, initial_state: torch.Tensor | None, K: int
) -> torch.Tensor:
    """The last K-1 inputs (b, C, K-1), zeroed where they belong to another document than the last token."""
    b, L, C = x.shape
    hist = initial_state.transpose(1, 2).to(x.dtype) if initial_state is not None else x.new_zeros(b, K - 1, C)
    tail = torch.cat([hist, x[:, max(0, L - (K - 1)) :]], dim=1)[:, -(K - 1) :] if K > 1 else x[:, :0]
    if seq_idx is not None and K > 1:
        doc = seq_idx.long()
        doc_full = torch.cat([doc[:, :1].expand(b, K - 1), doc[:, max(0, L - (K - 1)) :]], dim=1)[:, -(K - 1) :]
        tail = tail * (doc_full == doc[:, -1:]).unsqueeze(-1)
    return tail.transpose(1, 2)


def causal_conv1d_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    y = _CausalConv1d.apply(x, weight, bias, seq_idx, initial_state, activation == "silu")
    return y, _final_state(x, seq_idx, initial_state, weight.shape[1])
