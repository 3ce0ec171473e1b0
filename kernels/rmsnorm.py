"""RMSNorm and the Mamba mixer's gated group RMSNorm, computed in fp32, returned in x.dtype.

rms_norm(x)             = w * x * rsqrt(mean(x^2) + eps)                      (over the last dim)
gated_rms_norm(x, z)    = w * g * rsqrt(mean_group(g^2) + eps),  g = x * silu(z)  (per group of channels)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentforge.kernels._dispatch import compute_dtype, use_triton

__all__ = ["rms_norm", "rms_norm_ref", "gated_rms_norm", "gated_rms_norm_ref"]


def _check_weight(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{name}: weight must be ({x.shape[-1]},) to match x's last dim, got {tuple(weight.shape)}")


def _check_gated(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int) -> None:
    _check_weight("gated_rms_norm", x, weight)
    if z.shape != x.shape:
        raise ValueError(f"gated_rms_norm: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if group_size < 1 or x.shape[-1] % group_size != 0:
        raise ValueError(
            f"gated_rms_norm: group_size ({group_size}) must divide the last dim ({x.shape[-1]}); "
            "it is d_inner / n_groups"
        )


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    _check_weight("rms_norm", x, weight)
    cdt = compute_dtype(x, weight)
    xf = x.to(cdt)
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(cdt)
    return out.to(x.dtype)


def gated_rms_norm_ref(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float = 1e-5
) -> torch.Tensor:
    _check_gated(x, z, weight, group_size)
    cdt = compute_dtype(x, z, weight)
    g = x.to(cdt) * F.silu(z.to(cdt))
    shape = g.shape
    g = g.view(*shape[:-1], shape[-1] // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.view(shape) * weight.to(cdt)).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """RMSNorm over the last dim: Triton on CUDA tensors, else :func:`rms_norm_ref`."""
    if use_triton(x, weight):
        from latentforge.kernels.rmsnorm_triton import rms_norm_triton

        _check_weight("rms_norm", x, weight)
        return rms_norm_triton(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def gated_rms_norm(
    x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, group_size: int, eps: float = 1e-5
) -> torch.Tensor:
    """Group RMSNorm of x * silu(z): Triton on CUDA tensors, else :func:`gated_rms_norm_ref`."""
    if use_triton(x, z, weight):
        from latentforge.kernels.rmsnorm_triton import gated_rms_norm_triton

        _check_gated(x, z, weight, group_size)
        return gated_rms_norm_triton(x, z, weight, group_size, eps)
    return gated_rms_norm_ref(x, z, weight, group_size, eps)
