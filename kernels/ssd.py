"""Mamba-2 SSD scan (state-space duality), chunked and exact.

Recurrence per head (state (p, n), fp32):
    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t (outer) B_t
    y_t = <h_t, C_t> + D * x_t            (then y_t *= silu(z_t) when z is given)
with the state reset to zero where ``seq_idx`` changes (packed documents), and ``initial_state`` applying
to the first document of each row.

The chunked form (Mamba-2 paper, section 6) splits the sequence into chunks of Q tokens:
  1. inside a chunk, y is a masked "attention" ``(C_i . B_j) * exp(acum_i - acum_j) * dt_j`` over j <= i;
  2. each chunk summarises its tokens into the state at its end;
  3. the chunk-end states are combined across chunks (a tiny scan over chunks, written here as one
     masked decay matrix so there is no Python loop);
  4. every token reads the state entering its chunk, decayed to its position.
Document resets become masks: because ``seq_idx`` is non-decreasing, "no reset between s and t" is
exactly ``seq_idx[s] == seq_idx[t]``, inside a chunk and across chunks alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentforge.kernels._dispatch import compute_dtype, use_triton

__all__ = ["ssd_scan", "ssd_scan_ref", "ssd_update"]


def _check_inputs(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    chunk_size: int,
    seq_idx: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    z: torch.Tensor | None,
) -> None:
    if x.dim() != 4:
        raise ValueError(f"ssd_scan: x must be (batch, seqlen, heads, headdim), got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if dt.shape != (b, l, h):
        raise ValueError(f"ssd_scan: dt must be (batch, seqlen, heads) = {(b, l, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"ssd_scan: A must be (heads,) = ({h},), got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, l) or C.shape != B.shape:
        raise ValueError(
            f"ssd_scan: B and C must both be (batch, seqlen, groups, dstate) with batch, seqlen = {(b, l)}; "
            f"got B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    g = B.shape[2]
    if h % g != 0:
        raise ValueError(f"ssd_scan: heads ({h}) must be a multiple of groups ({g})")
    n = B.shape[3]
    if D is not None and D.shape != (h,):
        raise ValueError(f"ssd_scan: D must be (heads,) = ({h},) or None, got {tuple(D.shape)}")
    if chunk_size < 1:
        raise ValueError(f"ssd_scan: chunk_size must be >= 1, got {chunk_size}")
    if seq_idx is not None and seq_idx.shape != (b, l):
        raise ValueError(f"ssd_scan: seq_idx must be (batch, seqlen) = {(b, l)}, got {tuple(seq_idx.shape)}")
    if initial_state is not None and initial_state.shape != (b, h, p, n):
        raise ValueError(
            f"ssd_scan: initial_state must be (batch, heads, headdim, dstate) = {(b, h, p, n)}, "
            f"got {tuple(initial_state.shape)}"
        )
    if z is not None and z.shape != x.shape:
        raise ValueError(f"ssd_scan: z must have the shape of x {tuple(x.shape)}, got {tuple(z.shape)}")


def _masked_exp(log_decay: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    # where() on the exponent (not after exp): masked entries may be large positive and would overflow,
    # and inf * 0 would poison the backward with NaN.
    return torch.exp(torch.where(keep, log_decay, torch.full_like(log_decay, float("-inf"))))


def ssd_scan_ref(
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
    """Pure-PyTorch chunked SSD; differentiable by autograd. Returns (y in x.dtype, final_state fp32).

    Computes in fp32 (fp64 when any input is fp64). Shapes: see INTERFACES.md (kernels/ssd.py)."""
    _check_inputs(x, dt, A, B, C, D, chunk_size, seq_idx, initial_state, z)
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g  # heads per group
    Q = chunk_size
    cdt = compute_dtype(x, dt, A, B, C, D, initial_state)
    state_dtype = torch.float64 if cdt == torch.float64 else torch.float32

    # Pad to whole chunks: dt = 0 means "no decay, no input", so padding leaves the state untouched.
    nchunks = max(1, -(-l // Q))
    pad = nchunks * Q - l
    xs, dts, Bs, Cs = (t.to(cdt) for t in (x, dt, B, C))
    if pad:
        xs = F.pad(xs, (0, 0, 0, 0, 0, pad))
        dts = F.pad(dts, (0, 0, 0, pad))
        Bs = F.pad(Bs, (0, 0, 0, 0, 0, pad))
        Cs = F.pad(Cs, (0, 0, 0, 0, 0, pad))
    if seq_idx is None:
        seq = torch.zeros(b, nchunks * Q, dtype=torch.long, device=x.device)
    else:
        seq = seq_idx.long()
        if pad:
            seq = torch.cat([seq, seq[:, -1:].expand(b, pad)], dim=1)

    xs = xs.view(b, nchunks, Q, g, r, p)
    dts = dts.view(b, nchunks, Q, g, r)
    Bs = Bs.view(b, nchunks, Q, g, n)
    Cs = Cs.view(b, nchunks, Q, g, n)
    seq = seq.view(b, nchunks, Q)

    acum = torch.cumsum(dts * A.to(cdt).view(g, r), dim=2)  # (b, c, Q, g, r): log decay from chunk start

    # 1. intra-chunk: y_i += sum_{j<=i, same doc} (C_i . B_j) exp(acum_i - acum_j) dt_j x_j
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    same_doc = seq.unsqueeze(-1) == seq.unsqueeze(-2)  # (b, c, i, j)
    keep = (causal & same_doc)[:, :, None, None]  # (b, c, 1, 1, i, j)
    a = acum.permute(0, 1, 3, 4, 2)  # (b, c, g, r, Q)
    decay = _masked_exp(a.unsqueeze(-1) - a.unsqueeze(-2), keep)  # (b, c, g, r, i, j)
    CB = torch.einsum("bcign,bcjgn->bcgij", Cs, Bs)
    dtx = dts.unsqueeze(-1) * xs  # (b, c, Q, g, r, p)
    y = torch.einsum("bcgij,bcgrij,bcjgrp->bcigrp", CB, decay, dtx)

    # 2. chunk summaries: state at the chunk end from its own tokens (same doc as the last token)
    same_as_last = (seq == seq[:, :, -1:])[:, :, :, None, None]  # (b, c, Q, 1, 1)
    to_end = _masked_exp(acum[:, :, -1:] - acum, same_as_last)  # (b, c, Q, g, r)
    chunk_states = torch.einsum("bcjgn,bcjgr,bcjgrp->bcgrpn", Bs, to_end, dtx)

    # 3. across chunks: entering[k] = state entering chunk k; entry 0 is the initial state, whose document
    #    is the row's first one. states[k'] -> entering[k] decays by the chunk totals in between, and only
    #    if no reset happened (same doc id at both chunk ends).
    if initial_state is None:
        init = torch.zeros(b, 1, g, r, p, n, dtype=cdt, device=x.device)
    else:
        init = initial_state.to(cdt).view(b, 1, g, r, p, n)
    states = torch.cat([init, chunk_states], dim=1)  # (b, c+1, g, r, p, n)
    end_doc = torch.cat([seq[:, :1, 0], seq[:, :, -1]], dim=1)  # (b, c+1)
    totals = F.pad(acum[:, :, -1], (0, 0, 0, 0, 1, 0))  # (b, c+1, g, r)
    tcum = torch.cumsum(totals, dim=1)
    chunk_keep = torch.ones(nchunks + 1, nchunks + 1, dtype=torch.bool, device=x.device).tril()
    chunk_keep = (chunk_keep & (end_doc.unsqueeze(-1) == end_doc.unsqueeze(-2)))[:, None, None]
    tc = tcum.permute(0, 2, 3, 1)  # (b, g, r, c+1)
    chunk_decay = _masked_exp(tc.unsqueeze(-1) - tc.unsqueeze(-2), chunk_keep)  # (b, g, r, to, from)
    entering = torch.einsum("bgrzk,bkgrpn->bzgrpn", chunk_decay, states)  # (b, c+1, g, r, p, n)
    final_state = entering[:, -1]

    # 4. every token reads the state entering its chunk, if it is still in that state's document
    reads = seq == end_doc[:, :-1].unsqueeze(-1)  # (b, c, Q)
    from_start = _masked_exp(acum, reads[:, :, :, None, None])  # (b, c, Q, g, r)
    y = y + torch.einsum("bcign,bcgrpn,bcigr->bcigrp", Cs, entering[:, :-1], from_start)

    y = y.reshape(b, nchunks * Q, h, p)[:, :l]
    if D is not None:
        y = y + D.to(cdt).view(h, 1) * x.to(cdt)
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(x.dtype), final_state.reshape(b, h, p, n).to(state_dtype)


def ssd_scan(
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
    """Mamba-2 chunked scan: Triton on CUDA tensors, else :func:`ssd_scan_ref`. Returns (y, final_state)."""
    if use_triton(x, dt, B, C):
        from latentforge.kernels.ssd_triton import ssd_scan_triton, supports

        _check_inputs(x, dt, A, B, C, D, chunk_size, seq_idx, initial_state, z)
        if supports(chunk_size):  # other chunk sizes (not a multiple of 16) take the reference
            return ssd_scan_triton(
                x, dt, A, B, C, D, chunk_size=chunk_size, seq_idx=seq_idx, initial_state=initial_state, z=z
            )
    return ssd_scan_ref(x, dt, A, B, C, D, chunk_size=chunk_size, seq_idx=seq_idx, initial_state=initial_state, z=z)


def ssd_update(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    state: torch.Tensor,
    per_token_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode step: the recurrence token by token over s new tokens of one document, from ``state`` (b, h, p, n).

    For a handful of tokens (decoding, draft verification) this is cheaper than the chunked scan, which pads every
    call to a whole chunk. Shapes as :func:`ssd_scan`. Returns (y in x.dtype, states in state's dtype): the state
    after the last token (b, h, p, n), or with ``per_token_states`` the state after each token (b, s, h, p, n), so
    that a rejected draft rolls back by picking one. Computes in fp32 (fp64 when an input is fp64).
    """
    _check_inputs(x, dt, A, B, C, D, 1, None, state, None)
    b, s, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g  # heads per group
    cdt = compute_dtype(x, dt, A, B, C, D, state)
    # grouped views, no copies: head i = (group i // r, member i % r) reads its group's B and C
    xs = x.to(cdt).view(b, s, g, r, p)
    Bs = B.to(cdt).view(b, s, g, 1, 1, n)
    Cs = C.to(cdt).view(b, s, g, 1, 1, n)
    dts = dt.to(cdt).view(b, s, g, r, 1)
    decay = torch.exp(dts * A.to(cdt).view(g, r, 1)).unsqueeze(-1)  # (b, s, g, r, 1, 1)
    dtx = (dts * xs).unsqueeze(-1)  # (b, s, g, r, p, 1)
    current = state.to(cdt).view(b, g, r, p, n)
    ys, states = [], []
    for t in range(s):
        current = current * decay[:, t] + dtx[:, t] * Bs[:, t]
        ys.append((current * Cs[:, t]).sum(-1))
        if per_token_states:
            states.append(current)
    y = ys[0].unsqueeze(1) if s == 1 else torch.stack(ys, dim=1)  # (b, s, g, r, p)
    if D is not None:
        y = y + D.to(cdt).view(g, r, 1) * xs
    if per_token_states:
        out_state = torch.stack(states, dim=1).view(b, s, h, p, n)
    else:
        out_state = current.reshape(b, h, p, n)
    return y.reshape(b, s, h, p).to(x.dtype), out_state.to(state.dtype)
