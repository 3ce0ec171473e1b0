"""The dense squared-ReLU MLP (`-` layers, and the MoE's shared expert): `down(relu(up(x))^2)`."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .mixer_types import LayerState, MixerContext


def squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: Optional[torch.Tensor] = None,
        state: Optional[LayerState] = None,
        context: Optional[MixerContext] = None,
    ) -> torch.Tensor:
        return self.down_proj(squared_relu(self.up_proj(x)))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.up_proj.weight, std=std)
        nn.init.normal_(self.down_proj.weight, std=out_std)
