"""Per-unit preparation of a stage: (meta) initialisation, activation checkpointing, torch.compile, FSDP2.

A stage part is processed one *unit* at a time (embedding, each block, final norm, lm_head, MTP block), in this
order per unit (as TorchTitan): initialise it if it was built on the meta device, tensor/context/expert
parallelise it, apply activation checkpointing / compile in place (inside FSDP's hooks, names unchanged),
then fully_shard it. A model built on the meta device therefore never exists unsharded: the peak is one unit.

FSDP2 gradients are *summed* over data-parallel ranks (divide factor 1): the losses are already normalised by the
global batch's token counts (see context.py).

Mixed precision (the precision recipe's param_dtype / reduce_dtype): the parameters stay fp32 (the optimizer's
master weights). Under FSDP2 a `MixedPrecisionPolicy` casts every gathered weight of a unit to the compute dtype
(as TorchTitan does: the Mamba A_log / dt_bias / D and the norm weights too, and the residual stream is bf16) and
reduces gradients in `reduce_dtype`; the MoE routers are their own units with an fp32 policy, so the router weight
and its GEMM stay fp32 (its input is the bf16 hidden state). Without FSDP (one process, or pure TP/PP) the stage
forward runs under `torch.autocast` instead: parameters, the residual stream and the router stay fp32, the GEMMs
run in bf16. The two paths therefore round differently; both keep the loss's logits in fp32 (linear_cross_entropy
turns autocast off). Gradients of TP-replicated parameters are all-reduced in fp32 either way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from latentforge.data.config import use_persistent_compile_cache
from latentforge.model.config import ModelConfig
from latentforge.model.hybrid import Block, HybridModel
from latentforge.model.mtp import MTPBlock
from latentforge.model.norm import RMSNorm

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.device_mesh import DeviceMesh

    from .mesh import Groups


def units(part: HybridModel) -> list[tuple[int, str, nn.Module]]:
    """(unit index in the whole model, kind, module) of every unit this part holds, in model order."""
    n = part.cfg.num_layers
    found: list[tuple[int, str, nn.Module]] = []
    if part.backbone.embeddings is not None:
        found.append((0, "embeddings", part.backbone.embeddings))
    for key, block in part.numbered_layers():
        found.append((3 + key, "block", block))
    if part.backbone.norm_f is not None:
        found.append((2, "norm_f", part.backbone.norm_f))
    if part.lm_head is not None:
        found.append((1, "lm_head", part.lm_head))
    if part.mtp is not None:
        found.append((3 + n, "mtp", part.mtp))
    return found


@torch.no_grad()
def initialise_unit(
    index: int, kind: str, module: nn.Module, cfg: ModelConfig, device: torch.device, base_seed: int
) -> None:
    """Allocate a meta-built unit on `device` and initialise it as HybridModel.init_weights does, from its own
    seed (base_seed + unit index): the same values under every parallel layout (on one device type)."""
    module.to_empty(device=device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(base_seed + index)
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.num_layers) if cfg.scale_output_init else std
        # the asserts narrow `module` to what `units` pairs with each kind
        if kind in ("embeddings", "lm_head"):
            assert isinstance(module, (nn.Embedding, nn.Linear))
            torch.nn.init.normal_(module.weight, std=std)
        elif kind == "norm_f":
            assert isinstance(module, RMSNorm)
            module.init_weights()
        elif kind == "block":
            assert isinstance(module, Block)
            module.norm.init_weights()
            module.mixer.init_weights(std, out_std)
        elif kind == "mtp":
            assert isinstance(module, MTPBlock)
            module.init_weights(std, out_std)


def wrap_unit(kind: str, module: nn.Module, checkpointed: set[str], compile_blocks: bool) -> None:
    """Activation checkpointing and/or torch.compile of a block (or each MTP layer), in place: the composable
    `checkpoint` (forward hooks, no wrapper module) and `nn.Module.compile`, so forward and every parameter name
    stay as they are (checkpoints, optimizer state and FSDP see the same model)."""
    from torch.distributed._composable import checkpoint

    if kind == "block":
        assert isinstance(module, Block)
        targets = [module] if module.kind in checkpointed else []
        compiled: list[nn.Module] = [module]
    elif kind == "mtp":
        assert isinstance(module, MTPBlock)
        targets = list(module.layers) if "mtp" in checkpointed else []
        compiled = list(module.layers)
    else:
        return
    for target in targets:
        checkpoint(target)
    if compile_blocks:
        use_persistent_compile_cache()
        for target in compiled:
            target.compile()


class _AutocastHooks:
    """torch.autocast around a module's forward, entered by a forward pre-hook and left by an always-called forward
    hook (also when the forward raises): the module's forward is not replaced."""

    def __init__(self, device_type: str, dtype: torch.dtype) -> None:
        self.device_type, self.dtype = device_type, dtype
        self.active: list[torch.autocast] = []  # one per forward in progress (a nested call of the same module)

    def install(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self.enter)
        module.register_forward_hook(self.leave, always_call=True)

    def enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        region = torch.autocast(self.device_type, dtype=self.dtype)
        region.__enter__()
        self.active.append(region)

    def leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.active.pop().__exit__(None, None, None)


class Sharder:
    """fully_shard over the data-parallel mesh (2-D for HSDP); routed experts over their own mesh; the compute
    dtype (module doc)."""

    def __init__(
        self,
        groups: Groups,
        reshard_after_forward: bool = True,
        compute_dtype: torch.dtype = torch.float32,
        reduce_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.mesh = groups.fsdp_mesh()
        self.expert_mesh = groups.expert_fsdp_mesh()
        self.reshard_after_forward = reshard_after_forward
        self.compute_dtype = compute_dtype
        self.mixed = (compute_dtype, reduce_dtype) != (torch.float32, torch.float32)
        self.policies: Optional[dict[str, MixedPrecisionPolicy]] = None
        if self.mixed and self.active:
            from torch.distributed.fsdp import MixedPrecisionPolicy

            self.policies = {
                "default": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce_dtype),
                "fp32": MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32),
            }
        self.modules: list[nn.Module] = []

    @property
    def active(self) -> bool:
        return self.mesh is not None

    def activation_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """What flows between blocks (and pipeline stages): the compute dtype when FSDP casts the weights;
        under autocast the residual stream keeps the weights' dtype (the embedding's output)."""
        return self.compute_dtype if self.policies else param_dtype

    def _shard(self, module: nn.Module, mesh: Optional[DeviceMesh], reshard: bool, policy: str = "default") -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp_policy = self.policies[policy] if self.policies else MixedPrecisionPolicy()  # fully_shard's default
        sharded = fully_shard(module, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp_policy)
        sharded.set_gradient_divide_factor(1.0)
        sharded.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        self.modules.append(module)

    def shard_unit(self, kind: str, module: nn.Module) -> None:
        if not self.active:
            return
        from latentforge.model.moe import Router

        from .expert_parallel import ExpertParallelExperts

        for sub in module.modules():
            if isinstance(sub, ExpertParallelExperts):
                self._shard(sub, self.expert_mesh, self.reshard_after_forward)
            elif isinstance(sub, Router) and self.policies:
                self._shard(sub, self.mesh, False, policy="fp32")  # E x H: cheap to keep gathered for backward
        if kind == "block":
            self._shard(module, self.mesh, self.reshard_after_forward)
        elif kind == "mtp":
            assert isinstance(module, MTPBlock)
            for layer in module.layers:
                self._shard(layer, self.mesh, self.reshard_after_forward)

    def shard_root(self, stage: nn.Module) -> None:
        # the root holds the embedding / final norm / lm_head; the backward needs them again right away
        if self.active:
            self._shard(stage, self.mesh, False)
        elif self.compute_dtype != torch.float32:
            device_type = next(stage.parameters()).device.type
            _AutocastHooks(device_type, self.compute_dtype).install(stage)
