"""RMSNorm, computed in fp32: `w * x * rsqrt(mean(x^2) + eps)` (no `1 + w` offset)."""

import torch
from torch import nn

from latentforge.kernels.rmsnorm import gated_rms_norm, rms_norm

from .shards import local_tensor


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class GatedRMSNorm(nn.Module):
    """RMSNorm of `x * silu(z)` over groups of `group_size` channels (the Mamba-2 output norm, after gating)."""

    def __init__(self, size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return gated_rms_norm(x, z, local_tensor(self.weight), self.group_size, self.eps)  # a TP shard: its channels

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)
