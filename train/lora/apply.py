"""Put adapters on a model by module-name pattern, freeze the base, merge them back in."""

from __future__ import annotations

import re
import warnings
from typing import Optional

import torch
from torch import nn

from .config import PEFT_REFUSED, LoRAConfig, LoRAConfigError, PEFTCompatibilityWarning
from .layers import add_lora_experts, add_lora_linear, is_lora_module, lora_param_names, merge_and_remove, remove

PLAIN_NAME = re.compile(r"^[\w.]+$")


def name_matches(name: str, pattern: str) -> bool:
    """A plain dotted name matches as a suffix at a dot boundary; anything else is a full-match regex."""
    if PLAIN_NAME.match(pattern):
        return name == pattern or name.endswith("." + pattern)
    return re.fullmatch(pattern, name) is not None


def find_targets(model: nn.Module, cfg: LoRAConfig) -> tuple[list[str], list[str]]:
    """(linear names, routed-expert module names) that `cfg` adapts, in module order."""
    linears: list[str] = []
    experts: list[str] = []
    unmatched = set(cfg.targets)
    for name, module in model.named_modules():
        if not cfg.include_mtp and name.startswith("mtp."):
            continue
        hits = [p for p in cfg.targets if name_matches(name, p)]
        if hits:
            if not isinstance(module, nn.Linear):
                raise LoRAConfigError(
                    f"lora.targets pattern(s) {hits} matched {name!r}, a {type(module).__name__}, not a Linear layer. "
                    "Target Linear layers only (routed experts: lora.routed_experts=true)"
                )
            linears.append(name)
            unmatched -= set(hits)
        if (
            cfg.routed_experts
            and name.endswith("mixer.experts")
            and hasattr(module, "up_proj")
            and isinstance(module.up_proj, nn.Parameter)
        ):
            experts.append(name)
    if unmatched:
        raise LoRAConfigError(
            f"lora.targets pattern(s) {sorted(unmatched)} match no Linear module of this model"
            f"{' outside the MTP block' if not cfg.include_mtp else ''}. Linear names look like "
            "'backbone.layers.1.mixer.q_proj'; fix the pattern or drop it"
        )
    if cfg.routed_experts and not experts:
        raise LoRAConfigError("lora.routed_experts=true but the model has no MoE layer; set it to false")
    return linears, experts


def peft_refused(name: str) -> bool:
    """Whether stock PEFT refuses a LoRA adapter on this module of NemotronH (see config.PEFT_REFUSED)."""
    return name.rpartition(".")[2] in PEFT_REFUSED


def apply_lora(model: nn.Module, cfg: LoRAConfig, warn_peft: bool = True) -> list[str]:
    """Add adapters (in place), freeze everything else, optionally cast the frozen base; returns adapted names.

    Apply it after precision emulation (which replaces Linear modules) and before the model is parallelised
    (tensor-parallel layers then use their slices of the factors; see layers.py). `warn_peft`: warn when a target is a module
    stock PEFT refuses (Mamba out_proj), whose adapter our model trains and merges but PEFT will not load.
    """
    if any(is_lora_module(m) for m in model.modules()):
        raise RuntimeError("this model already carries LoRA adapters; merge or remove them first")
    linears, experts = find_targets(model, cfg)
    refused = [n for n in linears if peft_refused(n)]
    if refused and warn_peft:
        warnings.warn(
            f"LoRA on {len(refused)} Mamba out_proj layer(s) (e.g. {refused[0]}): training, our checkpoints and the "
            "merged Hugging Face export handle it, but stock PEFT (0.21) refuses LoRA on a module named out_proj "
            "or conv1d in a nemotron_h model (transformers' fused Mamba training kernel reads out_proj.weight "
            "directly, bypassing an adapter), so PeftModel.from_pretrained will not load this adapter directory. "
            "Drop out_proj from lora.targets for a PEFT-loadable adapter",
            PEFTCompatibilityWarning,
            stacklevel=2,
        )
    generator = None
    if cfg.init_seed is not None:
        generator = torch.Generator().manual_seed(cfg.init_seed)
    for name in linears:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear), "find_targets only returns Linear layers"
        add_lora_linear(
            linear,
            name,
            cfg.rank,
            cfg.scaling,
            cfg.dropout,
            generator=generator,
            row_blocks=_row_blocks(model, name),
        )
    for name in experts:
        add_lora_experts(model.get_submodule(name), name, cfg.rank, cfg.scaling, generator=generator)
    freeze_base(model, getattr(torch, cfg.base_dtype) if cfg.base_dtype else None)
    return linears + experts


def _row_blocks(model: nn.Module, name: str) -> Optional[list[int]]:
    """How the output rows of Linear `name` split over tensor-parallel ranks: a Mamba in_proj's z | x | B | C | dt
    blocks (each rank a slice of each), else None (one block)."""
    from latentforge.model.mamba import Mamba2Mixer

    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    return parent.in_proj_blocks() if isinstance(parent, Mamba2Mixer) and leaf == "in_proj" else None


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{module name: module} of every adapted module."""
    return {name: m for name, m in model.named_modules() if is_lora_module(m)}


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{parameter name: parameter} of the adapters only."""
    out = {}
    for name, module in lora_modules(model).items():
        for pname in lora_param_names(module):
            out[f"{name}.{pname}"] = getattr(module, pname)
    return out


@torch.no_grad()
def freeze_base(model: nn.Module, dtype: Optional[torch.dtype] = None) -> None:
    """requires_grad only on adapter parameters; the base may be cast to `dtype` (adapters keep theirs)."""
    adapter_ids = {id(p) for p in lora_parameters(model).values()}
    for module in model.modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if id(param) in adapter_ids:
                param.requires_grad_(True)
                continue
            param.requires_grad_(False)
            if dtype is not None and param.is_floating_point() and param.dtype != dtype:
                setattr(module, pname, nn.Parameter(param.to(dtype), requires_grad=False))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (in place); the model is a plain model again, all trainable."""
    for module in lora_modules(model).values():
        merge_and_remove(module)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    for module in lora_modules(model).values():
        remove(module)
    return model
