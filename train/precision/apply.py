"""apply_precision: resolve the policy, check the machine can run it, swap the GEMM modules in place."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from latentforge.kernels.quant import EmulatedRecipe, ExpertGemm, make_recipe, quantized_linear

from .config import PrecisionConfig
from .policy import (
    MOE_ALIGNMENT,
    PrecisionTable,
    check_support,
    check_te_shapes,
    detect_capability,
    is_experts,
    resolve_policy,
)
from .te_backend import TEExpertGemm, make_te_linear, te_available as _te_available


class EmulatedLinear(nn.Linear):
    """nn.Linear whose three GEMMs run through an emulated recipe (kernels.quant.quantized_linear).

    Holds the original weight/bias Parameters, so names, values and dtype (the checkpoint) are unchanged.
    Stays an nn.Linear for code that dispatches on the type.
    """

    def __init__(self, source: nn.Linear, fmt: str, recipe: EmulatedRecipe) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = source.in_features, source.out_features
        self.weight = source.weight
        if source.bias is not None:
            self.bias = source.bias
        else:
            self.register_parameter("bias", None)
        self.format = fmt
        self.recipe = recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, format={self.format} (emulated)"


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _already_applied(model: nn.Module) -> bool:
    for module in model.modules():
        if isinstance(module, EmulatedLinear) or hasattr(module, "lf_recipe"):
            return True
        if getattr(module, "linear_fn", None) is not None and hasattr(module, "up_proj"):
            return True
    return False


def apply_precision(
    model: nn.Module,
    cfg: PrecisionConfig,
    *,
    device_capability: Optional[tuple[int, int]] = None,
    te_available: Optional[bool] = None,
) -> PrecisionTable:
    """Apply the precision policy of `cfg` to `model` in place; return the table of every GEMM's format.

    Quantized linears become `EmulatedLinear` (cfg.emulate) or a Transformer Engine `te.Linear` under the
    format's autocast; routed experts get a `linear_fn` doing the same per expert GEMM (on TE also the
    format's row alignment). `device_capability` / `te_available` default to what this machine has.
    Raises PrecisionUnsupportedError (naming the requirement and the alternatives) when it cannot run here.
    """
    if isinstance(cfg, dict) or not isinstance(cfg, PrecisionConfig):
        cfg = PrecisionConfig.from_dict(cfg)
    if _already_applied(model):
        raise RuntimeError("apply_precision was already applied to this model; build a fresh model to change it")
    table = resolve_policy(model, cfg)
    if device_capability is None:
        device_capability = detect_capability()
    if te_available is None:
        te_available = _te_available() if not cfg.emulate else False
    check_support(table, emulate=cfg.emulate, device_capability=device_capability, te_available=te_available)
    if not cfg.emulate:
        check_te_shapes(table)

    generator = None
    for entry in table:
        if not entry.quantized:
            continue
        module = model.get_submodule(entry.name)
        options = cfg.recipe_options(entry.format)
        if cfg.emulate and entry.format == "nvfp4" and cfg.nvfp4_stochastic_rounding:
            if generator is None:
                device = next(iter(module.parameters())).device
                device = "cpu" if device.type == "meta" else device
                generator = torch.Generator(device=device).manual_seed(cfg.seed)
            options["generator"] = generator
        if entry.kind == "linear":
            assert isinstance(module, nn.Linear), "resolve_policy's linear entries are nn.Linear modules"
            if cfg.emulate:
                new = EmulatedLinear(module, entry.format, make_recipe(entry.format, **options))
            else:
                new = make_te_linear(module, entry.format, cfg)
            _set_submodule(model, entry.name, new)
        elif entry.kind == "experts":
            assert is_experts(module), "resolve_policy's experts entries are stacked experts"
            if cfg.emulate:
                module.linear_fn = ExpertGemm(entry.format, **options)
            else:
                module.linear_fn = TEExpertGemm(entry.format, cfg)
                module.alignment = MOE_ALIGNMENT[entry.format]
                entry.alignment = module.alignment
        entry.backend = "emulated" if cfg.emulate else "te"
    return table
