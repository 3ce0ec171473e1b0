"""Expert parallelism: each EP rank holds E / ep routed experts; tokens travel to their experts and back.

Dispatch (dropless): the local (token, choice) assignments are sorted by global expert (kernels.moe.moe_permute),
the per-expert counts are exchanged, and one uneven all_to_all_single moves the rows (and their routing weights)
to the ranks owning their experts. There the rows are regrouped by local expert (padded to the precision recipe's
alignment), run through kernels.moe.grouped_mlp with the routing weight fused as in the single-process path, put
back in arrival order, and returned by the reverse all-to-all; moe_unpermute sums each token's choices.

The weights are DTensors `Shard(0)` on the EP mesh under the unsharded names (`...experts.up_proj` (E, I, D)), so
checkpoints reshard between EP sizes. Each parameter keeps its `requires_grad` (a LoRA-frozen base stays frozen).
LoRA adapters on the routed experts (train.lora, `lora_A_up_proj` (E, r, D) ...) are sharded the same way and the
layer stays a LoRA layer: its forward adds each local expert's B_e @ A_e to the local weights and calls
`run_experts`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from latentforge.kernels.moe import LinearFn, grouped_mlp, moe_permute, moe_unpermute, row_weights
from latentforge.model.moe import Experts

from .collectives import all_to_all
from .tensor_parallel import local, shard_parameter


class ExpertParallelExperts(nn.Module):
    """Drop-in for model.moe.Experts (same parameter names and forward signature) over an EP group."""

    # shard_parameter sets these as DTensor parameters (torch's stubs type a module attribute as Tensor | Module)
    up_proj: torch.Tensor
    down_proj: torch.Tensor

    def __init__(self, experts: Experts, ep_mesh: DeviceMesh, src_data_rank: Optional[int] = 0) -> None:
        super().__init__()
        from latentforge.train.lora.layers import LoRAExpertsMixin, lora_class, lora_param_names

        self.num_experts = experts.up_proj.shape[0]
        self.ep_group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        adapters = lora_param_names(experts)  # [] unless train.lora adapted the experts
        for name in ("up_proj", "down_proj", *adapters):
            param = getattr(experts, name)
            setattr(self, name, param)
            shard_parameter(self, name, ep_mesh, 0, src_data_rank)
            getattr(self, name).requires_grad_(param.requires_grad)
        self.linear_fn: Optional[LinearFn] = experts.linear_fn
        self.alignment: int = experts.alignment
        if adapters:
            for attr in ("lora_rank", "lora_scaling", "lora_dropout", "lora_name"):
                setattr(self, attr, getattr(experts, attr))
            self.__class__ = lora_class(LoRAExpertsMixin, type(self))  # forward: adapted weights -> run_experts

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        return self.run_experts(x, topk_idx, topk_weight, local(self.up_proj), local(self.down_proj))

    def run_experts(
        self,
        x: torch.Tensor,
        topk_idx: torch.Tensor,
        topk_weight: torch.Tensor,
        w_up: torch.Tensor,
        w_down: torch.Tensor,
    ) -> torch.Tensor:
        """The layer on this rank's experts' weights `w_up` (E / ep, I, D) and `w_down` (E / ep, D, I)."""
        ep, local_experts = self.ep, w_up.shape[0]
        x_sorted, perm = moe_permute(x, topk_idx, self.num_experts, alignment=1)
        weights_sorted = row_weights(perm, topk_weight)
        counts = perm.tokens_per_expert  # (E,) ordered by owner rank, then local expert
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=self.ep_group)
        received = received.view(ep, local_experts)  # [source rank, local expert]
        send_splits = counts.view(ep, local_experts).sum(1).tolist()
        recv_splits = received.sum(1).tolist()

        x_in = all_to_all(x_sorted, recv_splits, send_splits, self.ep_group)
        w_in = all_to_all(weights_sorted.unsqueeze(-1), recv_splits, send_splits, self.ep_group).squeeze(-1)
        destination, per_expert_padded, rows = _regroup(received, self.alignment)
        x_grouped = x_in.new_zeros(rows, x_in.shape[1]).index_copy(0, destination, x_in)
        w_grouped = w_in.new_zeros(rows).index_copy(0, destination, w_in)
        y_grouped = grouped_mlp(x_grouped, per_expert_padded, w_up, w_down, w_grouped, self.linear_fn)
        y_back = all_to_all(y_grouped.index_select(0, destination), send_splits, recv_splits, self.ep_group)
        return moe_unpermute(y_back, perm, None)


def _regroup(received: torch.Tensor, alignment: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Arrival order (source rank, then local expert) -> rows grouped by local expert, each padded to `alignment`.

    Returns (destination row of every arrived row, rows per local expert (padded), total rows)."""
    ep, local_experts = received.shape
    device = received.device
    expert_of_row = torch.arange(local_experts, device=device).repeat(ep).repeat_interleave(received.flatten())
    per_expert = received.sum(0)
    padded = (per_expert + alignment - 1) // alignment * alignment
    offsets = torch.cumsum(padded, 0) - padded
    order = torch.sort(expert_of_row, stable=True).indices  # by expert, then by source rank
    first_of_expert = torch.cumsum(per_expert, 0) - per_expert
    rank_in_expert = torch.arange(order.numel(), device=device) - first_of_expert[expert_of_row[order]]
    destination = torch.empty_like(order)
    destination[order] = offsets[expert_of_row[order]] + rank_in_expert
    return destination, padded, int(padded.sum())


def apply_expert_parallel(parts: Sequence[nn.Module], ep_mesh: DeviceMesh, src_data_rank: Optional[int] = 0) -> None:
    """Replace every LatentMoE's experts by an ExpertParallelExperts over `ep_mesh` (same names)."""
    from latentforge.model.moe import LatentMoE

    for part in parts:
        for module in list(part.modules()):
            # Experts (or its LoRA subclass) until replaced: ExpertParallelExperts is not one
            if isinstance(module, LatentMoE) and isinstance(module.experts, Experts):
                module.experts = ExpertParallelExperts(module.experts, ep_mesh, src_data_rank)
