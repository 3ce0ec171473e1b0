"""Triton MoE: permute / unpermute gathers and a grouped GEMM with the squared-ReLU epilogue.

Grouped GEMM scheduling: every expert's rows are cut into BLOCK_M tiles; a small device-side table maps
each program to (expert, first row, end row) so uneven loads and empty experts cost nothing and no host
sync is needed (the grid is an upper bound; surplus programs exit at once).

    out[m, n] = sum_k a[m, k] * w[e(m), n, k]        (w read through strides: transposes are free)
    epilogue "up":   h = out (saved), act = relu(h)^2 * row_weight[m]
    epilogue "dact": dh = out * 2 relu(h) * row_weight[m],  d(row_weight)[m] += sum_n out * relu(h)^2,
                     and act is recomputed for the down projection's weight gradient
    wgrad:           dw[e, n, k] = sum_{m in e} dout[m, n] * a[m, k]
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from latentforge.kernels.moe import MoEPermState
from latentforge.kernels.triton_launch import launch

EPI_NONE, EPI_UP, EPI_DACT = 0, 1, 2
NUM_WARPS = {"_grouped_gemm_kernel": 8, "_grouped_wgrad_kernel": 4}  # chosen for no spills on sm_90


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _gemm_blocks() -> tuple[int, int, int]:
    # the interpreter runs each program in numpy: small tiles keep tests fast
    return (16, 16, 16) if _interpreting() else (64, 128, 64)


# ----------------------------------------------------------------------------------------------------------
# permute / unpermute


@triton.jit
def _gather_rows_kernel(SRC, IDX, DST, n_rows, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[r] = src[idx[r]], zero where idx[r] < 0 (padding rows)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok, d_ok = r < n_rows, d < D
    src = tl.load(IDX + r, mask=r_ok, other=-1)
    v = tl.load(SRC + src.to(tl.int64)[:, None] * D + d[None, :], mask=(src >= 0)[:, None] & d_ok[None, :], other=0.0)
    tl.store(DST + r.to(tl.int64)[:, None] * D + d[None, :], v, mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _combine_kernel(Y_SORTED, ROWS, W, OUT, T, D, K, HAS_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[t] = sum_j w[t, j] * y_sorted[rows[t, j]], accumulated in fp32."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok, d_ok = t < T, d < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for j in range(K):
        row = tl.load(ROWS + t * K + j, mask=t_ok, other=0)
        v = tl.load(
            Y_SORTED + row.to(tl.int64)[:, None] * D + d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        if HAS_W:
            v *= tl.load(W + t * K + j, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        acc += v
    tl.store(
        OUT + t.to(tl.int64)[:, None] * D + d[None, :], acc.to(OUT.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :]
    )


@triton.jit
def _combine_bwd_kernel(DOUT, Y_SORTED, ROWS, W, DY_SORTED, DW, D, K, HAS_W: tl.constexpr, BLOCK_D: tl.constexpr):
    """dy_sorted[rows[t, j]] = w[t, j] * dout[t];  dw[t, j] = <dout[t], y_sorted[rows[t, j]]>. One token each."""
    t = tl.program_id(0)
    for j in range(K):
        row = tl.load(ROWS + t * K + j).to(tl.int64)
        w = tl.load(W + t * K + j).to(tl.float32) if HAS_W else 1.0
        dot = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            g = tl.load(DOUT + t.to(tl.int64) * D + d, mask=d < D, other=0.0).to(tl.float32)
            tl.store(DY_SORTED + row * D + d, (g * w).to(DY_SORTED.dtype.element_ty), mask=d < D)
            if HAS_W:
                dot += g * tl.load(Y_SORTED + row * D + d, mask=d < D, other=0.0).to(tl.float32)
        if HAS_W:
            tl.store(DW + t * K + j, tl.sum(dot, axis=0))


def _gather_rows(src: torch.Tensor, idx: torch.Tensor, n_rows: int) -> torch.Tensor:
    D = src.shape[1]
    out = torch.empty(n_rows, D, dtype=src.dtype, device=src.device)
    block_r, block_d = (16, 32) if _interpreting() else (32, 128)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(D, block_d))
    if n_rows:
        launch(_gather_rows_kernel, grid)(src, idx, out, n_rows, D, BLOCK_R=block_r, BLOCK_D=block_d)
    return out


def _source_rows(state: MoEPermState) -> torch.Tensor:
    """Token feeding each permuted row, -1 for padding rows."""
    T, k = state.row_of_assignment.shape
    src = torch.full((state.num_rows,), -1, dtype=torch.int32, device=state.row_of_assignment.device)
    tokens = torch.arange(T, dtype=torch.int32, device=src.device).repeat_interleave(k)
    src[state.row_of_assignment.reshape(-1)] = tokens
    return src


def _combine(y_sorted: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor | None, T: int) -> torch.Tensor:
    D, K = y_sorted.shape[1], rows.shape[1]
    out = torch.empty(T, D, dtype=y_sorted.dtype, device=y_sorted.device)
    block_t, block_d = (16, 32) if _interpreting() else (16, 128)
    if T:
        launch(_combine_kernel, (triton.cdiv(T, block_t), triton.cdiv(D, block_d)))(
            y_sorted,
            rows,
            weight if weight is not None else y_sorted,
            out,
            T,
            D,
            K,
            HAS_W=weight is not None,
            BLOCK_T=block_t,
            BLOCK_D=block_d,
        )
    return out


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, src_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(rows)
        return _gather_rows(x.contiguous(), src_rows, src_rows.shape[0])

    @staticmethod
    def backward(ctx, dx_sorted: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (rows,) = ctx.saved_tensors  # each token's rows: the transpose of a gather is a combine
        return _combine(dx_sorted.contiguous(), rows, None, rows.shape[0]), None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
        y_sorted = y_sorted.contiguous()
        ctx.save_for_backward(y_sorted, rows, weight)
        return _combine(y_sorted, rows, weight, rows.shape[0])

    @staticmethod
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y_sorted, rows, weight = ctx.saved_tensors
        T, K = rows.shape
        D = y_sorted.shape[1]
        dy_sorted = torch.zeros_like(y_sorted)  # padding rows get no gradient
        dw = torch.empty(T, K, dtype=torch.float32, device=dout.device) if weight is not None else None
        if T:
            launch(_combine_bwd_kernel, (T,))(
                dout.contiguous(),
                y_sorted,
                rows,
                weight if weight is not None else y_sorted,
                dy_sorted,
                dw if dw is not None else dy_sorted,
                D,
                K,
                HAS_W=weight is not None,
                BLOCK_D=min(1024, triton.next_power_of_2(D)) if not _interpreting() else 32,
            )
        return dy_sorted, None, (dw.to(weight.dtype) if dw is not None and weight is not None else None)


def moe_permute_triton(x: torch.Tensor, state: MoEPermState) -> torch.Tensor:
    rows = state.row_of_assignment.to(torch.int32).contiguous()
    return _Permute.apply(x, _source_rows(state), rows)


def moe_unpermute_triton(y_sorted: torch.Tensor, state: MoEPermState, topk_weight: torch.Tensor | None) -> torch.Tensor:
    T, k = state.row_of_assignment.shape
    if topk_weight is not None and topk_weight.shape != (T, k):
        raise ValueError(f"moe_unpermute: topk_weight must be {(T, k)}, got {tuple(topk_weight.shape)}")
    rows = state.row_of_assignment.to(torch.int32).contiguous()
    return _Unpermute.apply(y_sorted, rows, topk_weight.contiguous() if topk_weight is not None else None)


# ----------------------------------------------------------------------------------------------------------
# grouped GEMM


def _tile_table(counts: torch.Tensor, block_m: int) -> tuple[torch.Tensor, int]:
    """Per M-tile (expert, first row, end row) on device; the row count is an upper bound for the grid."""
    E = counts.shape[0]
    counts = counts.to(torch.int64)
    row_end = torch.cumsum(counts, 0)
    row_start = row_end - counts
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    tile_start = tile_end - tiles
    return torch.stack([row_start, row_end, tile_start, tile_end]).to(torch.int32).contiguous(), E


@triton.jit
def _tile_lookup(TABLE, tile, E, BLOCK_M: tl.constexpr):
    """Expert owning M-tile `tile` (E when past the last tile), its first row and the expert's end row."""
    tile_end = tl.load(TABLE + 3 * E + tl.arange(0, 1024), mask=tl.arange(0, 1024) < E, other=2**30)
    e = tl.sum((tile_end <= tile).to(tl.int32), axis=0)  # experts entirely before this tile
    e_safe = tl.minimum(e, E - 1)
    row_start = tl.load(TABLE + e_safe)
    row_end = tl.load(TABLE + E + e_safe)
    tile_start = tl.load(TABLE + 2 * E + e_safe)
    return e, row_start + (tile - tile_start) * BLOCK_M, row_end


@triton.jit
def _grouped_gemm_kernel(
    A,
    W,
    OUT,
    H,
    ACT,
    ROW_W,
    DROW_W,
    TABLE,
    E,
    N,
    K,
    stride_we,
    stride_wn,
    stride_wk,
    EPILOGUE: tl.constexpr,
    HAS_ROW_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e, m0, m_end = _tile_lookup(TABLE, tl.program_id(0), E, BLOCK_M)
    if e < E:
        m = m0 + tl.arange(0, BLOCK_M)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = m < m_end, n < N
        w_base = W + e.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(A + m.to(tl.int64)[:, None] * K + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
            w = tl.load(
                w_base + k[:, None] * stride_wk + n[None, :] * stride_wn,
                mask=(k < K)[:, None] & n_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, w, acc)
        out_off = m.to(tl.int64)[:, None] * N + n[None, :]
        ok = m_ok[:, None] & n_ok[None, :]
        if EPILOGUE == 0:
            tl.store(OUT + out_off, acc.to(OUT.dtype.element_ty), mask=ok)
        else:
            rw = tl.load(ROW_W + m, mask=m_ok, other=0.0).to(tl.float32)[:, None] if HAS_ROW_W else 1.0
            if EPILOGUE == 1:
                h = acc.to(H.dtype.element_ty)
                tl.store(H + out_off, h, mask=ok)
                r = tl.maximum(h.to(tl.float32), 0.0)
                tl.store(OUT + out_off, (r * r * rw).to(OUT.dtype.element_ty), mask=ok)
            else:
                r = tl.maximum(tl.load(H + out_off, mask=ok, other=0.0).to(tl.float32), 0.0)
                tl.store(OUT + out_off, (acc * 2.0 * r * rw).to(OUT.dtype.element_ty), mask=ok)
                tl.store(ACT + out_off, (r * r * rw).to(ACT.dtype.element_ty), mask=ok)
                if HAS_ROW_W:
                    tl.atomic_add(DROW_W + m, tl.sum(acc * r * r, axis=1), mask=m_ok)


@triton.jit
def _grouped_wgrad_kernel(
    DOUT,
    A,
    DW,
    TABLE,
    E,
    N,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = n < N, k < K
    row_start = tl.load(TABLE + e)
    row_end = tl.load(TABLE + E + e)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(row_start, row_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < row_end
        g = tl.load(DOUT + m.to(tl.int64)[None, :] * N + n[:, None], mask=n_ok[:, None] & m_ok[None, :], other=0.0)
        a = tl.load(A + m.to(tl.int64)[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(g, a, acc)
    tl.store(
        DW + e.to(tl.int64) * N * K + n[:, None] * K + k[None, :],
        acc.to(DW.dtype.element_ty),
        mask=n_ok[:, None] & k_ok[None, :],
    )


def _grouped_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    w_strides: tuple[int, ...],
    N: int,
    table: torch.Tensor,
    E: int,
    epilogue: int = EPI_NONE,
    h: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    drow_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """out = a @ w_e^T per expert, w_e indexed [n, k] through w_strides = (expert, n, k)."""
    R, K = a.shape
    bm, bn, bk = _gemm_blocks()
    out = torch.empty(R, N, dtype=a.dtype, device=a.device)
    act = torch.empty(R, N, dtype=a.dtype, device=a.device) if epilogue == EPI_DACT else None
    if epilogue == EPI_UP:
        h = torch.empty(R, N, dtype=a.dtype, device=a.device)
    if R:
        grid = (triton.cdiv(R, bm) + E, triton.cdiv(N, bn))
        launch(_grouped_gemm_kernel, grid)(
            a,
            w,
            out,
            h if h is not None else out,
            act if act is not None else out,
            row_weight if row_weight is not None else out,
            drow_weight if drow_weight is not None else out,
            table,
            E,
            N,
            K,
            *w_strides,
            EPILOGUE=epilogue,
            HAS_ROW_W=row_weight is not None,
            BLOCK_M=bm,
            BLOCK_N=bn,
            BLOCK_K=bk,
            num_warps=NUM_WARPS["_grouped_gemm_kernel"],
        )
    return out, h, act


def _grouped_wgrad(
    dout: torch.Tensor, a: torch.Tensor, table: torch.Tensor, E: int, out_dtype: torch.dtype
) -> torch.Tensor:
    R, N = dout.shape
    K = a.shape[1]
    bm, bn, bk = _gemm_blocks()
    # each program reduces over all of its expert's rows in fp32 registers, so dw is written once, in the
    # weight dtype (no fp32 copy of the expert weights); experts without rows get zeros
    dw = torch.empty(E, N, K, dtype=out_dtype, device=a.device)
    launch(_grouped_wgrad_kernel, (E, triton.cdiv(N, bn), triton.cdiv(K, bk)))(
        dout, a, dw, table, E, N, K, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=NUM_WARPS["_grouped_wgrad_kernel"]
    )
    return dw


class _GroupedMLP(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        counts: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
        row_weight: torch.Tensor | None,
    ) -> torch.Tensor:
        E, I, d = w_up.shape
        x = x.contiguous()
        bm = _gemm_blocks()[0]
        table, _ = _tile_table(counts, bm)
        rw = row_weight.contiguous() if row_weight is not None else None
        act, h, _ = _grouped_gemm(x, w_up, w_up.stride(), I, table, E, EPI_UP, row_weight=rw)
        y, _, _ = _grouped_gemm(act, w_down, w_down.stride(), d, table, E)
        ctx.save_for_backward(x, h, w_up, w_down, rw, table)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, h, w_up, w_down, rw, table = ctx.saved_tensors
        E, I, d = w_up.shape
        dy = dy.contiguous()
        drw = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device) if rw is not None else None
        # d(act) = dy @ w_down_e, i.e. w_down_e^T indexed [n = i, k = d]: swap the n / k strides
        sd = w_down.stride()
        dh, _, act = _grouped_gemm(
            dy, w_down, (sd[0], sd[2], sd[1]), I, table, E, EPI_DACT, h=h, row_weight=rw, drow_weight=drw
        )
        assert act is not None  # the EPI_DACT epilogue recomputes the activation
        su = w_up.stride()
        dx, _, _ = _grouped_gemm(dh, w_up, (su[0], su[2], su[1]), d, table, E)
        dw_down = _grouped_wgrad(dy, act, table, E, w_down.dtype)
        dw_up = _grouped_wgrad(dh, x, table, E, w_up.dtype)
        return dx, None, dw_up, dw_down, (drw.to(rw.dtype) if drw is not None and rw is not None else None)


def grouped_mlp_triton(
    x_sorted: torch.Tensor,
    tokens_per_expert_padded: torch.Tensor,
    w_up: torch.Tensor,
    w_down: torch.Tensor,
    row_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    E = w_up.shape[0]
    if E > 1024:
        raise ValueError(f"grouped_mlp: the Triton path supports up to 1024 experts per rank, got {E}")
    counts = tokens_per_expert_padded.to(device=x_sorted.device)  # callers may count on the host
    return _GroupedMLP.apply(x_sorted, counts, w_up, w_down, row_weight)
