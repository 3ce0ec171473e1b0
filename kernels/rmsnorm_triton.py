"""Triton RMSNorm and gated group RMSNorm (forward and backward), one kernel pair for both.

A program owns one group of channels for a block of rows; plain RMSNorm is the one-group case.
Gating g = x * silu(z) is fused in, so the gated product never goes to memory. fp32 math throughout.
Backward per group (r = rstd of the group, u = w * dy):
    dg = r * u - r^3 * g * mean(u * g)        dx = dg * silu(z)      dz = dg * x * silu'(z)
    dw = sum over rows of dy * g * r          (per-program partial sums, reduced by torch)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from latentforge.kernels.triton_launch import launch


NUM_WARPS = {"_group_rms_fwd": 8, "_group_rms_bwd": 8}


@triton.jit
def _group_rms_fwd(
    X,
    Z,
    W,
    Y,
    RSTD,
    n_rows,
    D,
    group_size,
    n_groups,
    eps,
    HAS_Z: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr,
):
    """Program (row block, group): normalise one group of channels over ROWS_PER_PROG rows."""
    pid, grp = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    mask = s < group_size
    cols = grp * group_size + s
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    for r in range(ROWS_PER_PROG):
        row = pid * ROWS_PER_PROG + r
        if row < n_rows:
            base = row.to(tl.int64) * D
            g = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_Z:
                z = tl.load(Z + base + cols, mask=mask, other=0.0).to(tl.float32)
                g = g * z * tl.sigmoid(z)
            rstd = 1.0 / tl.sqrt(tl.sum(g * g, axis=0) / group_size + eps)
            tl.store(RSTD + row * n_groups + grp, rstd)
            tl.store(Y + base + cols, (g * rstd * w).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _group_rms_bwd(
    X,
    Z,
    W,
    RSTD,
    DY,
    DX,
    DZ,
    DW_PART,
    n_rows,
    D,
    group_size,
    n_groups,
    HAS_Z: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr,
):
    pid, grp = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    mask = s < group_size
    cols = grp * group_size + s
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for r in range(ROWS_PER_PROG):
        row = pid * ROWS_PER_PROG + r
        if row < n_rows:
            base = row.to(tl.int64) * D
            x = tl.load(X + base + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + base + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row * n_groups + grp)
            if HAS_Z:
                z = tl.load(Z + base + cols, mask=mask, other=0.0).to(tl.float32)
                sig = tl.sigmoid(z)
                g = x * z * sig
            else:
                g = x
            u = w * dy
            dg = rstd * u - rstd * rstd * rstd * g * (tl.sum(u * g, axis=0) / group_size)
            dw += dy * g * rstd
            if HAS_Z:
                tl.store(DX + base + cols, (dg * z * sig).to(DX.dtype.element_ty), mask=mask)
                dsilu = sig * (1.0 + z * (1.0 - sig))
                tl.store(DZ + base + cols, (dg * x * dsilu).to(DZ.dtype.element_ty), mask=mask)
            else:
                tl.store(DX + base + cols, dg.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW_PART + pid.to(tl.int64) * D + cols, dw, mask=mask)


def _launch_shape(n_rows: int, group_size: int) -> tuple[int, int, int]:
    block_s = triton.next_power_of_2(group_size)
    # enough programs to fill a GPU, few enough that the dw partials (programs x D fp32) stay small
    rows_per_prog = max(1, triton.cdiv(n_rows, 512))
    return block_s, rows_per_prog, triton.cdiv(n_rows, rows_per_prog)


class _GroupRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, z: torch.Tensor | None, weight: torch.Tensor, group_size: int, eps: float
    ) -> torch.Tensor:
        shape = x.shape
        D = shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        z2 = z.reshape(-1, D).contiguous() if z is not None else None
        n_rows, n_groups = x2.shape[0], D // group_size
        y = torch.empty_like(x2)
        rstd = torch.empty(n_rows, n_groups, dtype=torch.float32, device=x.device)
        bs, rpp, grid = _launch_shape(n_rows, group_size)
        launch(_group_rms_fwd, (grid, n_groups))(
            x2,
            z2 if z2 is not None else x2,
            weight.contiguous(),
            y,
            rstd,
            n_rows,
            D,
            group_size,
            n_groups,
            eps,
            HAS_Z=z is not None,
            BLOCK_S=bs,
            ROWS_PER_PROG=rpp,
            num_warps=NUM_WARPS["_group_rms_fwd"],
        )
        ctx.save_for_backward(x2, z2, weight, rstd)
        ctx.group_size, ctx.shape = group_size, shape
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, z2, weight, rstd = ctx.saved_tensors
        D = x2.shape[1]
        n_rows, n_groups = x2.shape[0], D // ctx.group_size
        dy2 = dy.reshape(-1, D).contiguous()
        dx = torch.empty_like(x2)
        dz = torch.empty_like(z2) if z2 is not None else None
        bs, rpp, grid = _launch_shape(n_rows, ctx.group_size)
        dw_part = torch.empty(grid, D, dtype=torch.float32, device=x2.device)
        launch(_group_rms_bwd, (grid, n_groups))(
            x2,
            z2 if z2 is not None else x2,
            weight.contiguous(),
            rstd,
            dy2,
            dx,
            dz if dz is not None else dx,
            dw_part,
            n_rows,
            D,
            ctx.group_size,
            n_groups,
            HAS_Z=z2 is not None,
            BLOCK_S=bs,
            ROWS_PER_PROG=rpp,
            num_warps=NUM_WARPS["_group_rms_bwd"],
        )
        dw = dw_part.sum(0).to(weight.dtype)
        return dx.view(ctx.shape), (dz.view(ctx.shape) if dz is not None else None), dw, None, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return _GroupRMSNorm.apply(x, None, weight, x.shape[-1], eps)


def gated_rms_norm_triton(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float = 1e-5
) -> torch.Tensor:
    return _GroupRMSNorm.apply(x, z, weight, group_size, eps)
