"""Tensor and sequence parallelism as a `parallelize_module` plan (as TorchTitan's apply_tp).

Between blocks every rank holds its own slice of the sequence (b, s / (cp * tp), H) as a plain tensor: the
context-parallel chunk, then the sequence-parallel piece of it. Each TP-split mixer gets a plan:
  input     PrepareModuleInput: the pieces are all-gathered over TP into this CP rank's chunk (a Replicate
            DTensor; its gradient is reduce-scattered back, Megatron's sequence parallelism)
  attention q/k/v ColwiseParallel (this rank's heads), o_proj RowwiseParallel reduce-scattered to pieces
  MLP       up ColwiseParallel, down RowwiseParallel (the dense `-` layers and the MoE's shared expert; routed
            experts keep their own tokens, expert_parallel.py splits them)
  Mamba     `MambaTensorParallel`: in_proj ColwiseParallel, out_proj RowwiseParallel, and this rank's heads'
            dt_bias / A_log / D / norm weight and groups' conv channels as Shard(0) DTensors
Every mixer then runs its own forward (model/): it reads its sizes from its local weights.

Mamba's in_proj rows (z | x | B | C | dt) and conv1d channels (x | B | C) are five (three) blocks of which each TP
rank computes one slice per block. They are stored *rank-contiguous* (rank 0's z, x, B, C, dt rows, then rank 1's
...), so `Shard(0)` is exactly a rank's rows and no weight is gathered at forward time. Checkpoints keep the
natural Hugging Face order: the mixer's state-dict hooks permute at save and load (`natural_order` /
`stored_order`), and `natural_optimizer_state` / `stored_optimizer_state` do the same for the optimizer's state,
so a checkpoint written in one layout loads in any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from latentforge.model.attention import Attention
from latentforge.model.mamba import Mamba2Mixer
from latentforge.model.mlp import MLP
from latentforge.model.moe import LatentMoE


# ----- weights -------------------------------------------------------------------------------------------------
def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter, differentiable."""
    return p.to_local() if isinstance(p, DTensor) else p


def shard_parameter(module: nn.Module, name: str, mesh: DeviceMesh, dim: int, src_data_rank: Optional[int] = 0) -> None:
    """Replace `module.<name>` by a DTensor Shard(dim) parameter over `mesh` (same name, global shape).

    `src_data_rank` 0 takes rank 0's values; None takes each rank's own copy (no communication: every rank built
    the same tensor)."""
    param = getattr(module, name)
    sharded = distribute_tensor(param.data, mesh, [Shard(dim)], src_data_rank=src_data_rank)
    if src_data_rank is None:
        # the local shard may be a view of the full tensor: own it, so the full one can be freed
        sharded = DTensor.from_local(
            sharded.to_local().clone(), mesh, [Shard(dim)], run_check=False, shape=param.shape, stride=param.stride()
        )
    setattr(module, name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def rank_rows(blocks: Sequence[int], tp: int, rank: int) -> torch.Tensor:
    """Indices (into the natural order) of TP rank `rank`'s slice of every block of sizes `blocks`."""
    pieces, offset = [], 0
    for size in blocks:
        step = size // tp
        pieces.append(torch.arange(offset + rank * step, offset + (rank + 1) * step))
        offset += size
    return torch.cat(pieces)


def rank_major_order(blocks: Sequence[int], tp: int) -> torch.Tensor:
    """stored[i] = natural[order[i]]: every rank's rows contiguous, in rank order."""
    return torch.cat([rank_rows(blocks, tp, rank) for rank in range(tp)])


# ----- plan ------------------------------------------------------------------------------------------------------
# _WeightOnly is a mixin in front of a ParallelStyle; the type checker sees it as one, so `super()._apply` checks
if TYPE_CHECKING:
    _StyleHost = ParallelStyle
else:
    _StyleHost = object


class _WeightOnly(_StyleHost):
    """Splits only a Linear's weight: other parameters on it (LoRA's factors, which read their slices from the
    weight's placement: train/lora/layers.py) stay whole, plain tensors (distribute_module would replicate them)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _no_bias(module)
        others = {name: p for name, p in module.named_parameters(recurse=False) if name != "weight"}
        for name in others:
            delattr(module, name)
        try:
            # abstract on ParallelStyle; the concrete style after this mixin (Colwise/RowwiseParallel) implements it
            return super()._apply(module, device_mesh)  # pyright: ignore[reportAbstractUsage]
        finally:
            for name, p in others.items():
                module.register_parameter(name, p)


class ColwiseLinear(_WeightOnly, ColwiseParallel):
    """ColwiseParallel of the weight alone (_WeightOnly); the unsplit copy is freed."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        shard_parameter(module, "weight", device_mesh, 0, self.src_data_rank)


class RowwiseLinear(_WeightOnly, RowwiseParallel):
    """RowwiseParallel of the weight alone (_WeightOnly); the unsplit copy is freed."""

    def _partition_linear_fn(self, name: str, module: nn.Module, device_mesh: DeviceMesh) -> None:
        shard_parameter(module, "weight", device_mesh, 1, self.src_data_rank)


def _no_bias(linear: nn.Module) -> None:
    if getattr(linear, "bias", None) is not None:
        raise ValueError(
            f"tensor parallelism: a {type(linear).__name__} with a bias; the plan splits the model's "
            "bias-free Linears only (add the bias's placement to ColwiseLinear / RowwiseLinear)"
        )


def _gather_sequence() -> PrepareModuleInput:
    return PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))


def _mlp_plan(module: nn.Module, mesh: DeviceMesh, src_data_rank: Optional[int]) -> None:
    parallelize_module(module, mesh, _gather_sequence())
    parallelize_module(
        module,
        mesh,
        {"up_proj": ColwiseLinear(), "down_proj": RowwiseLinear(output_layouts=Shard(1))},
        src_data_rank=src_data_rank,
    )


class MambaTensorParallel(ParallelStyle):
    """A Mamba-2 mixer split by heads (and B/C groups) over the TP mesh, stored rank-contiguous (module doc).
    `src_data_rank` (set by parallelize_module): 0 takes rank 0's weights, None each rank's own copy."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, Mamba2Mixer):
            raise TypeError(f"MambaTensorParallel splits a Mamba2Mixer, not a {type(module).__name__}")
        tp = device_mesh.size()
        in_order = rank_major_order(module.in_proj_blocks(), tp)
        conv_order = rank_major_order(module.conv_blocks(), tp)
        _permute_rows(module.in_proj, "weight", in_order)
        _permute_rows(module.conv1d, "weight", conv_order)
        _permute_rows(module.conv1d, "bias", conv_order)
        parallelize_module(module, device_mesh, _gather_sequence())
        parallelize_module(
            module,
            device_mesh,
            {"in_proj": ColwiseLinear(), "out_proj": RowwiseLinear(output_layouts=Shard(1))},
            src_data_rank=self.src_data_rank,
        )
        for owner, name in (
            (module.conv1d, "weight"),
            (module.conv1d, "bias"),
            (module, "dt_bias"),
            (module, "A_log"),
            (module, "D"),
            (module.norm, "weight"),
        ):
            shard_parameter(owner, name, device_mesh, 0, self.src_data_rank)
        module.register_state_dict_post_hook(_save_natural)
        module.register_load_state_dict_pre_hook(_load_stored)
        return module


def apply_tensor_parallel(unit: nn.Module, tp_mesh: DeviceMesh, src_data_rank: Optional[int] = 0) -> None:
    """Split the attention, Mamba, dense MLP and MoE shared-expert layers of `unit` over `tp_mesh`."""
    for module in list(unit.modules()):
        if isinstance(module, Attention):
            parallelize_module(module, tp_mesh, _gather_sequence())
            parallelize_module(
                module,
                tp_mesh,
                {
                    "q_proj": ColwiseLinear(),
                    "k_proj": ColwiseLinear(),
                    "v_proj": ColwiseLinear(),
                    "o_proj": RowwiseLinear(output_layouts=Shard(1)),
                },
                src_data_rank=src_data_rank,
            )
        elif isinstance(module, Mamba2Mixer):
            parallelize_module(module, tp_mesh, MambaTensorParallel(), src_data_rank=src_data_rank)
        elif isinstance(module, LatentMoE):
            _mlp_plan(module.shared_experts, tp_mesh, src_data_rank)
    shared = {id(m.shared_experts) for m in unit.modules() if isinstance(m, LatentMoE)}
    for module in list(unit.modules()):
        if isinstance(module, MLP) and id(module) not in shared:
            _mlp_plan(module, tp_mesh, src_data_rank)


# ----- Mamba's rank-contiguous storage <-> the natural (Hugging Face) order ----------------------------------------
@torch.no_grad()
def _permute_rows(module: nn.Module, name: str, order: torch.Tensor) -> None:
    param = getattr(module, name)
    param.data = param.data.index_select(0, order.to(param.device))


def _tp_size(t: torch.Tensor) -> int:
    if not isinstance(t, DTensor):
        return 1
    names = t.device_mesh.mesh_dim_names or ()
    return t.device_mesh.size(names.index("tp")) if "tp" in names else 1


def permuted_tensors(mixer: nn.Module) -> dict[str, torch.Tensor]:
    """{name relative to the mixer: stored order} of a TP-split Mamba mixer's rank-contiguous tensors ({} if none)."""
    if not isinstance(mixer, Mamba2Mixer):
        return {}
    tp = _tp_size(mixer.in_proj.weight)
    if tp == 1:
        return {}
    in_order = rank_major_order(mixer.in_proj_blocks(), tp)
    conv_order = rank_major_order(mixer.conv_blocks(), tp)
    return {"in_proj.weight": in_order, "conv1d.weight": conv_order, "conv1d.bias": conv_order}


def natural_order(t: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A rank-contiguous tensor (or DTensor: same placements) in the natural order (a collective for DTensors)."""
    full = t.full_tensor() if isinstance(t, DTensor) else t
    natural = torch.empty_like(full)
    natural[order.to(full.device)] = full
    return _like(natural, t)


def stored_order(t: torch.Tensor, order: torch.Tensor, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A natural-order tensor in the rank-contiguous order, placed as `like` (default: as `t`)."""
    full = t.full_tensor() if isinstance(t, DTensor) else t
    return _like(full.index_select(0, order.to(full.device)), t if like is None else like)


def _like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def _save_natural(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]) -> None:
    for name, order in permuted_tensors(module).items():
        if prefix + name in state_dict:
            state_dict[prefix + name] = natural_order(state_dict[prefix + name].detach(), order)


def _load_stored(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    owners = dict(module.named_parameters())
    for name, order in permuted_tensors(module).items():
        if prefix + name in state_dict:
            state_dict[prefix + name] = stored_order(state_dict[prefix + name], order, owners[name])


def _permuted_parameters(part: nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name in `part`: stored order} of every rank-contiguous tensor of `part`."""
    found = {}
    for prefix, module in part.named_modules():
        for name, order in permuted_tensors(module).items():
            found[f"{prefix}.{name}" if prefix else name] = order
    return found


def natural_optimizer_state(part: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """A flattened optimizer state dict (`state.<param>.<key>`) with the rank-contiguous tensors in natural order."""
    return _convert_optimizer_state(part, state, natural_order)


def stored_optimizer_state(part: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `natural_optimizer_state` (before set_optimizer_state_dict)."""
    return _convert_optimizer_state(part, state, stored_order)


def _convert_optimizer_state(
    part: nn.Module, state: dict[str, Any], convert: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> dict[str, Any]:
    permuted = _permuted_parameters(part)
    if not permuted:
        return state
    out = dict(state)
    for key, value in state.items():
        if not key.startswith("state.") or not torch.is_tensor(value) or value.dim() == 0:
            continue
        param = key[len("state.") :].rsplit(".", 1)[0]
        if param in permuted:
            out[key] = convert(value, permuted[param])
    return out


def natural_gradients(part: nn.Module) -> dict[str, Optional[torch.Tensor]]:
    """{parameter name: gradient} in the natural order (None where there is none): for comparing layouts."""
    permuted = _permuted_parameters(part)
    return {
        name: (natural_order(p.grad, permuted[name]) if name in permuted and p.grad is not None else p.grad)
        for name, p in part.named_parameters()
    }
