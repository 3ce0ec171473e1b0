"""A module's own shard of a parameter: under tensor parallelism (train/parallel/tensor_parallel.py) the weights a
mixer reads directly (not through an nn.Linear) are DTensors over the TP mesh; the mixer computes on its shard."""

import torch
from torch.distributed.tensor import DTensor


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of `t` (differentiable), or `t` itself when it is not a DTensor."""
    return t.to_local() if isinstance(t, DTensor) else t
