"""Triton Mamba-2 SSD chunked scan, forward and backward.

Split of the work (notation of kernels/ssd.py; per batch row b, head h, chunk c, in-chunk positions i, j):

  torch (elementwise, O(b l h), differentiable by autograd):
      acum      = cumsum over the chunk of dt * A                       (log decay from the chunk start)
      w_state_j = dt_j exp(acum_last - acum_j) [doc_j == doc of the chunk's last token]
      w_read_i  = exp(acum_i) [doc_i == doc of the state entering the chunk]
      decay_c   = exp(acum_last) [no document starts inside the chunk, relative to the entering state]
  Triton (this file; a custom autograd Function returning gradients for all of the above):
      S_c       = sum_j w_state_j x_j (outer) B_j                       _chunk_outer_kernel
      H_{c+1}   = decay_c H_c + S_c,  H_0 = initial state              _state_passing_fwd_kernel
      y_i       = sum_{j<=i, same doc} exp(acum_i - acum_j) dt_j (C_i . B_j) x_j
                  + w_read_i C_i . H_c + D x_i                          _chunk_scan_fwd_kernel
  Backward:
      dH from y: sum_i w_read_i dy_i (outer) C_i                       _chunk_outer_kernel again
      reverse state passing -> dS_c, d(decay_c), d(initial state)       _state_passing_bwd_kernel
      per j-block: dx, dB (per head), d(dt), d(acum) (j side), d(w_state)   _chunk_scan_bwd_j_kernel
      per i-block: dC (per head), d(acum) (i side), d(w_read)           _chunk_scan_bwd_i_kernel
  Groups: head h reads group h // (H / G); per-head dB, dC are summed over each group's heads in torch.
Dots between bf16 activations run in bf16 with fp32 accumulation; dots against the fp32 state run in
tf32 (ieee when the inputs are fp32).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from latentforge.kernels.triton_launch import launch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# chosen from ptxas register reports at Super's shapes (P 64, N 128, chunk 128): no or few spills on sm_90
NUM_WARPS = {
    "_chunk_outer_kernel": 8,
    "_chunk_scan_fwd_kernel": 4,
    "_chunk_scan_bwd_j_kernel": 8,
    "_chunk_scan_bwd_i_kernel": 8,
    "_state_passing_fwd_kernel": 4,
    "_state_passing_bwd_kernel": 4,
}


# ----------------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _chunk_outer_kernel(
    U,
    V,
    WT,
    OUT,
    L,
    H,
    G,
    NC,
    P,
    N,
    Q: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):
    """OUT[b, c, h] (P x N, fp32) = sum_{t in chunk c} WT[b, h, t] * U[b, t, h, :] (outer) V[b, t, g(h), :]."""
    pid_bh, c = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // H, pid_bh % H
    gg = hh // (H // G)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, Q, BLOCK):
        t = c * Q + j0 + tl.arange(0, BLOCK)
        t_ok = t < L
        bt = (b * L + t).to(tl.int64)
        u = tl.load(U + (bt[None, :] * H + hh) * P + p[:, None], mask=(p < P)[:, None] & t_ok[None, :], other=0.0)
        w = tl.load(WT + pid_bh.to(tl.int64) * NC * Q + t, mask=t_ok, other=0.0)
        v = tl.load(V + (bt[:, None] * G + gg) * N + n[None, :], mask=t_ok[:, None] & (n < N)[None, :], other=0.0)
        acc = tl.dot(u.to(tl.float32), v.to(tl.float32) * w[:, None], acc, input_precision=PREC)
    out = OUT + ((b.to(tl.int64) * NC + c) * H + hh) * P * N
    tl.store(out + p[:, None] * N + n[None, :], acc, mask=(p < P)[:, None] & (n < N)[None, :])


@triton.jit
def _state_passing_fwd_kernel(S, DECAY, INIT, HST, FINAL, H, NC, PN, HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
    """HST[b, c, h] = state entering chunk c;  state <- decay_c * state + S[b, c, h]."""
    pid_bh, blk = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // H, pid_bh % H
    e = blk * BLOCK + tl.arange(0, BLOCK)
    ok = e < PN
    if HAS_INIT:
        state = tl.load(INIT + pid_bh.to(tl.int64) * PN + e, mask=ok, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(NC):
        off = ((b.to(tl.int64) * NC + c) * H + hh) * PN + e
        tl.store(HST + off, state, mask=ok)
        decay = tl.load(DECAY + pid_bh.to(tl.int64) * NC + c)
        state = decay * state + tl.load(S + off, mask=ok, other=0.0)
    tl.store(FINAL + pid_bh.to(tl.int64) * PN + e, state, mask=ok)


@triton.jit
def _state_passing_bwd_kernel(
    DHY,
    HST,
    DECAY,
    DFINAL,
    DS,
    DINIT,
    DDECAY_PART,
    H,
    NC,
    PN,
    NBLK,
    BLOCK: tl.constexpr,
):
    """Reverse of the state recurrence: dS_c = g, d(decay_c) = <H_c, g>, g <- dHy_c + decay_c g."""
    pid_bh, blk = tl.program_id(0), tl.program_id(1)
    b, hh = pid_bh // H, pid_bh % H
    e = blk * BLOCK + tl.arange(0, BLOCK)
    ok = e < PN
    g = tl.load(DFINAL + pid_bh.to(tl.int64) * PN + e, mask=ok, other=0.0).to(tl.float32)
    for cc in range(NC):
        c = NC - 1 - cc
        off = ((b.to(tl.int64) * NC + c) * H + hh) * PN + e
        tl.store(DS + off, g, mask=ok)
        state = tl.load(HST + off, mask=ok, other=0.0)
        tl.store(DDECAY_PART + (pid_bh.to(tl.int64) * NC + c) * NBLK + blk, tl.sum(state * g, axis=0))
        decay = tl.load(DECAY + pid_bh.to(tl.int64) * NC + c)
        g = tl.load(DHY + off, mask=ok, other=0.0) + decay * g
    tl.store(DINIT + pid_bh.to(tl.int64) * PN + e, g, mask=ok)


@triton.jit
def _chunk_scan_fwd_kernel(
    X,
    DT,
    ACUM,
    WREAD,
    Bm,
    Cm,
    HST,
    D,
    SEQ,
    Y,
    L,
    H,
    G,
    NC,
    P,
    N,
    HAS_SEQ: tl.constexpr,
    HAS_D: tl.constexpr,
    Q: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):
    pid_bh, c, ib = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hh = pid_bh // H, pid_bh % H
    gg = hh // (H // G)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < P, n < N
    row = pid_bh.to(tl.int64) * NC * Q  # base of this (b, h) in the (b, h, NC*Q) per-position arrays
    i = c * Q + ib * BLOCK + tl.arange(0, BLOCK)
    i_ok = i < L
    bi = (b * L + i).to(tl.int64)
    Ci = tl.load(Cm + (bi[:, None] * G + gg) * N + n[None, :], mask=i_ok[:, None] & n_ok[None, :], other=0.0)
    a_i = tl.load(ACUM + row + i)
    seq_i = tl.load(SEQ + b.to(tl.int64) * NC * Q + i) if HAS_SEQ else i * 0

    # state entering the chunk, read by C_i
    hst = HST + ((b.to(tl.int64) * NC + c) * H + hh) * P * N
    Hc_t = tl.load(hst + p[None, :] * N + n[:, None], mask=n_ok[:, None] & p_ok[None, :], other=0.0)  # (N, P)
    w_read = tl.load(WREAD + row + i)
    acc = tl.dot(Ci.to(tl.float32) * w_read[:, None], Hc_t, input_precision=PREC)

    # inside the chunk, causal and within the document
    for j0 in range(0, (ib + 1) * BLOCK, BLOCK):
        j = c * Q + j0 + tl.arange(0, BLOCK)
        j_ok = j < L
        bj = (b * L + j).to(tl.int64)
        Bj = tl.load(Bm + (bj[:, None] * G + gg) * N + n[None, :], mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        cb = tl.dot(Ci, tl.trans(Bj), input_precision=PREC)
        a_j = tl.load(ACUM + row + j)
        dt_j = tl.load(DT + row + j)
        keep = (i[:, None] >= j[None, :]) & j_ok[None, :]
        if HAS_SEQ:
            seq_j = tl.load(SEQ + b.to(tl.int64) * NC * Q + j)
            keep = keep & (seq_i[:, None] == seq_j[None, :])
        m = cb * tl.exp(tl.where(keep, a_i[:, None] - a_j[None, :], -float("inf"))) * dt_j[None, :]
        xj = tl.load(X + (bj[:, None] * H + hh) * P + p[None, :], mask=j_ok[:, None] & p_ok[None, :], other=0.0)
        acc = tl.dot(m.to(xj.dtype), xj, acc, input_precision=PREC)

    x_off = (bi[:, None] * H + hh) * P + p[None, :]
    io = i_ok[:, None] & p_ok[None, :]
    if HAS_D:
        acc += tl.load(D + hh).to(tl.float32) * tl.load(X + x_off, mask=io, other=0.0).to(tl.float32)
    tl.store(Y + x_off, acc.to(Y.dtype.element_ty), mask=io)


@triton.jit
def _chunk_scan_bwd_j_kernel(
    X,
    DT,
    ACUM,
    WSTATE,
    Bm,
    Cm,
    DY,
    DS,
    D,
    SEQ,
    DX,
    DB_H,
    DDT,
    DACUM_J,
    DWSTATE,
    L,
    H,
    G,
    NC,
    P,
    N,
    HAS_SEQ: tl.constexpr,
    HAS_D: tl.constexpr,
    Q: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
):
    """Gradients owned by position j (a source token). COMPUTE_DB=False: dx_j, d dt_j, d acum_j (j side),
    d w_state_j; COMPUTE_DB=True: dB_j (this head's share). Two launches keep each variant's live tiles
    within the register file."""
    pid_bh, c, jb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hh = pid_bh // H, pid_bh % H
    gg = hh // (H // G)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < P, n < N
    row = pid_bh.to(tl.int64) * NC * Q
    j = c * Q + jb * BLOCK + tl.arange(0, BLOCK)
    j_ok = j < L
    bj = (b * L + j).to(tl.int64)
    jp = j_ok[:, None] & p_ok[None, :]
    jn = j_ok[:, None] & n_ok[None, :]
    xj = tl.load(X + (bj[:, None] * H + hh) * P + p[None, :], mask=jp, other=0.0)
    a_j = tl.load(ACUM + row + j)
    dt_j = tl.load(DT + row + j)
    w_state = tl.load(WSTATE + row + j)
    seq_j = tl.load(SEQ + b.to(tl.int64) * NC * Q + j) if HAS_SEQ else j * 0
    ds = DS + ((b.to(tl.int64) * NC + c) * H + hh) * P * N
    dS = tl.load(ds + p[:, None] * N + n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0)  # (P, N)

    if COMPUTE_DB:
        # through S_c = sum_j w_state_j x_j B_j^T, then the intra-chunk outputs y_i, i >= j
        dB = w_state[:, None] * tl.dot(xj.to(tl.float32), dS, input_precision=PREC)  # (BLOCK, N)
    else:
        Bj = tl.load(Bm + (bj[:, None] * G + gg) * N + n[None, :], mask=jn, other=0.0)
        dSB = tl.dot(Bj.to(tl.float32), tl.trans(dS), input_precision=PREC)  # (BLOCK, P)
        dx = w_state[:, None] * dSB
        dw_state = tl.sum(xj.to(tl.float32) * dSB, axis=1)
        ddt = tl.zeros((BLOCK,), dtype=tl.float32)
        dacum = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(jb * BLOCK, Q, BLOCK):
        i = c * Q + i0 + tl.arange(0, BLOCK)
        i_ok = i < L
        bi = (b * L + i).to(tl.int64)
        Ci = tl.load(Cm + (bi[:, None] * G + gg) * N + n[None, :], mask=i_ok[:, None] & n_ok[None, :], other=0.0)
        dyi = tl.load(DY + (bi[:, None] * H + hh) * P + p[None, :], mask=i_ok[:, None] & p_ok[None, :], other=0.0)
        a_i = tl.load(ACUM + row + i)
        keep = (i[None, :] >= j[:, None]) & i_ok[None, :]  # (j, i)
        if HAS_SEQ:
            seq_i = tl.load(SEQ + b.to(tl.int64) * NC * Q + i)
            keep = keep & (seq_i[None, :] == seq_j[:, None])
        decay = tl.exp(tl.where(keep, a_i[None, :] - a_j[:, None], -float("inf")))
        dm = tl.dot(xj, tl.trans(dyi), input_precision=PREC)  # (j, i): dy_i . x_j
        if COMPUTE_DB:
            dB = tl.dot((dm * decay * dt_j[:, None]).to(Ci.dtype), Ci, dB, input_precision=PREC)
        else:
            e = tl.dot(Bj, tl.trans(Ci), input_precision=PREC) * decay  # (j, i): (C_i . B_j) exp(acum_i - acum_j)
            dx = tl.dot((e * dt_j[:, None]).to(dyi.dtype), dyi, dx, input_precision=PREC)
            t = tl.sum(dm * e, axis=1)
            ddt += t  # pyright: ignore[reportOperatorIssue]  (bound in the same COMPUTE_DB branch above)
            dacum -= t * dt_j

    if COMPUTE_DB:
        tl.store(DB_H + (bj[:, None] * H + hh) * N + n[None, :], dB, mask=jn)
    else:
        x_off = (bj[:, None] * H + hh) * P + p[None, :]
        if HAS_D:
            dx += tl.load(D + hh).to(tl.float32) * tl.load(DY + x_off, mask=jp, other=0.0).to(tl.float32)
        tl.store(DX + x_off, dx.to(DX.dtype.element_ty), mask=jp)
        tl.store(DDT + row + j, ddt)
        tl.store(DACUM_J + row + j, dacum)
        tl.store(DWSTATE + row + j, dw_state)


@triton.jit
def _chunk_scan_bwd_i_kernel(
    X,
    DT,
    ACUM,
    WREAD,
    Bm,
    Cm,
    DY,
    HST,
    SEQ,
    DC_H,
    DACUM_I,
    DWREAD,
    L,
    H,
    G,
    NC,
    P,
    N,
    HAS_SEQ: tl.constexpr,
    Q: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PREC: tl.constexpr,
):
    """Gradients owned by position i (a reading token): dC_i (this head's share), d acum_i, d w_read_i."""
    pid_bh, c, ib = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, hh = pid_bh // H, pid_bh % H
    gg = hh // (H // G)
    p = tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    p_ok, n_ok = p < P, n < N
    row = pid_bh.to(tl.int64) * NC * Q
    i = c * Q + ib * BLOCK + tl.arange(0, BLOCK)
    i_ok = i < L
    bi = (b * L + i).to(tl.int64)
    i_n = i_ok[:, None] & n_ok[None, :]
    Ci = tl.load(Cm + (bi[:, None] * G + gg) * N + n[None, :], mask=i_n, other=0.0)
    dyi = tl.load(DY + (bi[:, None] * H + hh) * P + p[None, :], mask=i_ok[:, None] & p_ok[None, :], other=0.0)
    a_i = tl.load(ACUM + row + i)
    w_read = tl.load(WREAD + row + i)
    seq_i = tl.load(SEQ + b.to(tl.int64) * NC * Q + i) if HAS_SEQ else i * 0

    # through the state read w_read_i C_i . H_c
    hst = HST + ((b.to(tl.int64) * NC + c) * H + hh) * P * N
    Hc = tl.load(hst + p[:, None] * N + n[None, :], mask=p_ok[:, None] & n_ok[None, :], other=0.0)  # (P, N)
    dyH = tl.dot(dyi.to(tl.float32), Hc, input_precision=PREC)  # (BLOCK, N)
    dC = w_read[:, None] * dyH
    dw_read = tl.sum(Ci.to(tl.float32) * dyH, axis=1)

    dacum = tl.zeros((BLOCK,), dtype=tl.float32)
    for j0 in range(0, (ib + 1) * BLOCK, BLOCK):
        j = c * Q + j0 + tl.arange(0, BLOCK)
        j_ok = j < L
        bj = (b * L + j).to(tl.int64)
        Bj = tl.load(Bm + (bj[:, None] * G + gg) * N + n[None, :], mask=j_ok[:, None] & n_ok[None, :], other=0.0)
        xj = tl.load(X + (bj[:, None] * H + hh) * P + p[None, :], mask=j_ok[:, None] & p_ok[None, :], other=0.0)
        a_j = tl.load(ACUM + row + j)
        dt_j = tl.load(DT + row + j)
        keep = (i[:, None] >= j[None, :]) & j_ok[None, :]
        if HAS_SEQ:
            seq_j = tl.load(SEQ + b.to(tl.int64) * NC * Q + j)
            keep = keep & (seq_i[:, None] == seq_j[None, :])
        decay_dt = tl.exp(tl.where(keep, a_i[:, None] - a_j[None, :], -float("inf"))) * dt_j[None, :]
        cb = tl.dot(Ci, tl.trans(Bj), input_precision=PREC)
        dm = tl.dot(dyi, tl.trans(xj), input_precision=PREC)  # (i, j)
        dcb = dm * decay_dt
        dacum += tl.sum(dcb * cb, axis=1)
        dC = tl.dot(dcb.to(Bj.dtype), Bj, dC, input_precision=PREC)

    tl.store(DC_H + (bi[:, None] * H + hh) * N + n[None, :], dC, mask=i_n)
    tl.store(DACUM_I + row + i, dacum)
    tl.store(DWREAD + row + i, dw_read)


# ----------------------------------------------------------------------------------------------------------
# launchers


def _config(x: torch.Tensor, Q: int, P: int, N: int) -> dict[str, Any]:
    block = 16 if _interpreting() else next(bk for bk in (64, 32, 16) if Q % bk == 0)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"
    return dict(
        Q=Q,
        BLOCK=block,
        BLOCK_P=max(16, triton.next_power_of_2(P)),
        BLOCK_N=max(16, triton.next_power_of_2(N)),
        PREC=prec,
    )


def supports(chunk_size: int) -> bool:
    """The kernels tile a chunk in blocks of 16, 32 or 64 tokens: the chunk must be a multiple of 16."""
    return chunk_size % 16 == 0


def _chunk_outer(u: torch.Tensor, v: torch.Tensor, wt: torch.Tensor, nc: int, cfg: dict[str, Any]) -> torch.Tensor:
    b, L, H, P = u.shape
    G, N = v.shape[2], v.shape[3]
    out = torch.empty(b, nc, H, P, N, dtype=torch.float32, device=u.device)
    launch(_chunk_outer_kernel, (b * H, nc))(
        u,
        v,
        wt,
        out,
        L,
        H,
        G,
        nc,
        P,
        N,
        Q=cfg["Q"],
        BLOCK=cfg["BLOCK"],
        BLOCK_P=cfg["BLOCK_P"],
        BLOCK_N=cfg["BLOCK_N"],
        PREC=cfg["PREC"],
        num_warps=NUM_WARPS["_chunk_outer_kernel"],
    )
    return out


def _state_block(PN: int) -> int:
    return min(256 if _interpreting() else 1024, triton.next_power_of_2(PN))


class _SSDCore(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        dt: torch.Tensor,
        acum: torch.Tensor,
        w_state: torch.Tensor,
        w_read: torch.Tensor,
        decay: torch.Tensor,
        D: torch.Tensor | None,
        init: torch.Tensor | None,
        seq: torch.Tensor | None,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b, L, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        nc = dt.shape[2]
        cfg = _config(x, chunk_size, P, N)
        S = _chunk_outer(x, B, w_state, nc, cfg)
        hst = torch.empty_like(S)
        final = torch.empty(b, H, P, N, dtype=torch.float32, device=x.device)
        PN = P * N
        blk = _state_block(PN)
        launch(_state_passing_fwd_kernel, (b * H, triton.cdiv(PN, blk)))(
            S,
            decay,
            init if init is not None else S,
            hst,
            final,
            H,
            nc,
            PN,
            HAS_INIT=init is not None,
            BLOCK=blk,
        )
        del S
        y = torch.empty_like(x)
        launch(_chunk_scan_fwd_kernel, (b * H, nc, chunk_size // cfg["BLOCK"]))(
            x,
            dt,
            acum,
            w_read,
            B,
            C,
            hst,
            D if D is not None else dt,
            seq if seq is not None else dt,
            y,
            L,
            H,
            G,
            nc,
            P,
            N,
            HAS_SEQ=seq is not None,
            HAS_D=D is not None,
            **cfg,
            num_warps=NUM_WARPS["_chunk_scan_fwd_kernel"],
        )
        ctx.save_for_backward(x, B, C, dt, acum, w_state, w_read, decay, D, seq, hst)
        ctx.has_init = init is not None
        ctx.cfg = cfg
        return y, final

    @staticmethod
    def backward(ctx, dy: torch.Tensor, dfinal: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        x, B, C, dt, acum, w_state, w_read, decay, D, seq, hst = ctx.saved_tensors
        cfg = ctx.cfg
        b, L, H, P = x.shape
        G, N = B.shape[2], B.shape[3]
        nc = dt.shape[2]
        Q, PN = cfg["Q"], P * N
        dy = dy.contiguous()
        dfinal = (
            torch.zeros(b, H, P, N, dtype=torch.float32, device=x.device) if dfinal is None else dfinal.contiguous()
        )

        dHy = _chunk_outer(dy, C, w_read, nc, cfg)
        blk = _state_block(PN)
        nblk = triton.cdiv(PN, blk)
        dS = torch.empty_like(dHy)
        dinit = torch.empty(b, H, P, N, dtype=torch.float32, device=x.device)
        ddecay_part = torch.empty(b, H, nc, nblk, dtype=torch.float32, device=x.device)
        launch(_state_passing_bwd_kernel, (b * H, nblk))(
            dHy, hst, decay, dfinal, dS, dinit, ddecay_part, H, nc, PN, nblk, BLOCK=blk
        )
        del dHy

        dx = torch.empty_like(x)
        dB_h = torch.empty(b, L, H, N, dtype=torch.float32, device=x.device)
        dC_h = torch.empty(b, L, H, N, dtype=torch.float32, device=x.device)
        ddt, dacum_j, dacum_i, dw_state, dw_read = (
            torch.empty(b, H, nc, Q, dtype=torch.float32, device=x.device) for _ in range(5)
        )
        grid = (b * H, nc, Q // cfg["BLOCK"])
        seq_arg = seq if seq is not None else dt
        for compute_db in (False, True):
            launch(_chunk_scan_bwd_j_kernel, grid)(
                x,
                dt,
                acum,
                w_state,
                B,
                C,
                dy,
                dS,
                D if D is not None else dt,
                seq_arg,
                dx,
                dB_h,
                ddt,
                dacum_j,
                dw_state,
                L,
                H,
                G,
                nc,
                P,
                N,
                HAS_SEQ=seq is not None,
                HAS_D=D is not None,
                COMPUTE_DB=compute_db,
                **cfg,
                num_warps=NUM_WARPS["_chunk_scan_bwd_j_kernel"],
            )
        launch(_chunk_scan_bwd_i_kernel, grid)(
            x,
            dt,
            acum,
            w_read,
            B,
            C,
            dy,
            hst,
            seq_arg,
            dC_h,
            dacum_i,
            dw_read,
            L,
            H,
            G,
            nc,
            P,
            N,
            HAS_SEQ=seq is not None,
            **cfg,
            num_warps=NUM_WARPS["_chunk_scan_bwd_i_kernel"],
        )
        r = H // G
        dB = dB_h.view(b, L, G, r, N).sum(3).to(B.dtype)
        dC = dC_h.view(b, L, G, r, N).sum(3).to(C.dtype)
        dD = None
        if D is not None:
            dD = (dy.float() * x.float()).sum((0, 1, 3)).to(D.dtype)
        return (
            dx,
            dB,
            dC,
            ddt,
            dacum_i + dacum_j,
            dw_state,
            dw_read,
            ddecay_part.sum(-1),
            dD,
            dinit if ctx.has_init else None,
            None,
            None,
        )


def ssd_scan_triton(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    chunk_size: int = 128,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as kernels.ssd.ssd_scan_ref (inputs already validated by the dispatcher)."""
    b, L, H, P = x.shape
    Q = chunk_size
    nc = max(1, triton.cdiv(L, Q))
    pad = nc * Q - L

    # per-position decay weights: cheap elementwise torch, so autograd carries dt and A through them
    dtp = F.pad(dt.float(), (0, 0, 0, pad)).view(b, nc, Q, H).permute(0, 3, 1, 2)  # (b, H, nc, Q)
    acum = torch.cumsum(dtp * A.float().view(1, H, 1, 1), dim=-1)
    last = acum[..., -1:]
    if seq_idx is None:
        seq = None
        w_state = dtp * torch.exp(last - acum)
        w_read = torch.exp(acum)
        decay = torch.exp(last.squeeze(-1))
    else:
        seq3 = seq_idx.to(torch.int32)
        if pad:
            seq3 = torch.cat([seq3, seq3[:, -1:].expand(b, pad)], dim=1)
        seq = seq3.contiguous()
        seq3 = seq3.view(b, nc, Q)
        end_doc = seq3[:, :, -1]
        entering_doc = torch.cat([seq3[:, :1, 0], end_doc[:, :-1]], dim=1)
        ninf = torch.tensor(float("-inf"), device=x.device)
        w_state = dtp * torch.exp(torch.where((seq3 == end_doc[..., None]).unsqueeze(1), last - acum, ninf))
        w_read = torch.exp(torch.where((seq3 == entering_doc[..., None]).unsqueeze(1), acum, ninf))
        decay = torch.exp(torch.where((end_doc == entering_doc).unsqueeze(1), last.squeeze(-1), ninf))

    init = initial_state.float().contiguous() if initial_state is not None else None
    y, final = _SSDCore.apply(
        x.contiguous(),
        B.contiguous(),
        C.contiguous(),
        dtp.contiguous(),
        acum.contiguous(),
        w_state.contiguous(),
        w_read.contiguous(),
        decay.contiguous(),
        D.contiguous() if D is not None else None,
        init,
        seq,
        Q,
    )
    if z is not None:
        y = (y.float() * F.silu(z.float())).to(x.dtype)
    return y, final
