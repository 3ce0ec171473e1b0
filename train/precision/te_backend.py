"""Transformer Engine path (GPU): recipes, per-module autocast, `te.Linear` with the model's own parameters.

Transformer Engine is an optional extra (`pip install -e .[gpu]`); nothing here imports it at module load.
Each quantized module runs its forward inside `te.autocast(recipe=...)` of its own format, so one model can mix
NVFP4, MXFP8 and high-precision layers (the SPEC section 5 policy) without a global autocast in the trainer.
The wrapped modules keep the original `nn.Parameter` objects: parameter names, values and dtypes (the
checkpoint) do not change; TE adds its `_extra_state` (FP8 metadata such as the delayed-scaling amax history)
to the state dict, as every TE module does.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401  # pyright: ignore[reportMissingImports]  (the gpu extra)
    except Exception:  # ImportError, or TE built for another CUDA: either way it cannot run
        return False
    return True


def _te():
    try:
        import transformer_engine.pytorch as te  # pyright: ignore[reportMissingImports]  (the gpu extra)
    except Exception as exc:  # pragma: no cover - exercised only where TE is missing at run time
        raise ImportError(
            "Transformer Engine is not importable: install the GPU extra (pip install -e .[gpu]) "
            "or set precision.emulate=true"
        ) from exc
    return te


def make_te_recipe(fmt: str, cfg):
    """The Transformer Engine recipe object for one format (TE 2.x, transformer_engine.common.recipe)."""
    from transformer_engine.common import recipe as te_recipe  # pyright: ignore[reportMissingImports]

    fp8_format = te_recipe.Format.HYBRID if cfg.fp8_format == "hybrid" else te_recipe.Format.E4M3
    if fmt == "fp8_current":
        return te_recipe.Float8CurrentScaling(fp8_format=fp8_format)
    if fmt == "fp8_delayed":
        return te_recipe.DelayedScaling(
            fp8_format=fp8_format,
            amax_history_len=cfg.amax_history_len,
            amax_compute_algo=cfg.amax_compute_algo,
            margin=cfg.margin,
        )
    if fmt == "fp8_block":
        return te_recipe.Float8BlockScaling(fp8_format=te_recipe.Format.E4M3)
    if fmt == "mxfp8":
        return te_recipe.MXFP8BlockScaling(fp8_format=te_recipe.Format.E4M3)
    if fmt == "nvfp4":
        return te_recipe.NVFP4BlockScaling(
            disable_rht=not cfg.nvfp4_rht,
            disable_stochastic_rounding=not cfg.nvfp4_stochastic_rounding,
            disable_2d_quantization=not cfg.nvfp4_2d_weights,
        )
    raise ValueError(f"no Transformer Engine recipe for format {fmt!r}")


def te_autocast(recipe):
    """`te.autocast(recipe=...)` (TE >= 2.8), else the older `te.fp8_autocast(fp8_recipe=...)`."""
    te = _te()
    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


@functools.lru_cache(maxsize=None)
def _recipe_linear_class():
    te = _te()

    class RecipeLinear(te.Linear):
        """te.Linear that enters its own recipe's autocast (so formats can differ per module)."""

        def forward(self, inp, *args, **kwargs):
            with te_autocast(self.lf_recipe):
                return super().forward(inp, *args, **kwargs)

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, format={self.lf_format}"

    return RecipeLinear


def _adopt_parameter(module: nn.Module, name: str, param) -> None:
    """Make `param` (the model's own Parameter) the module's `name` parameter, replacing TE's fresh one."""
    module._parameters[name] = param


def make_te_linear(source: nn.Linear, fmt: str, cfg) -> nn.Module:
    """A TE Linear computing `source` in `fmt`, holding the very same weight (and bias) Parameters."""
    cls = _recipe_linear_class()
    weight = source.weight
    # build TE's own parameters on the meta device (nothing allocated), then adopt the model's
    lin = cls(
        source.in_features, source.out_features, bias=source.bias is not None, params_dtype=weight.dtype, device="meta"
    )
    _adopt_parameter(lin, "weight", weight)
    if source.bias is not None:
        _adopt_parameter(lin, "bias", source.bias)
    lin.lf_recipe = make_te_recipe(fmt, cfg)
    lin.lf_format = fmt
    return lin


class TEExpertGemm:
    """`linear_fn(x, w)` for the routed experts on Transformer Engine.

    The experts' weights are one stacked Parameter (E, out, in) that the checkpoint and the optimizer see; each
    expert GEMM hands its slice to a te.Linear shell of the right shape, so TE quantizes x, the weight slice and
    the gradient with the recipe and autograd routes the weight gradient into the stacked Parameter. One shell per
    weight shape: with DelayedScaling, the experts of one projection share one amax history.
    """

    def __init__(self, fmt: str, cfg):
        self.fmt = fmt
        self.recipe = make_te_recipe(fmt, cfg)
        self._shells: dict = {}

    def _shell(self, w: torch.Tensor) -> nn.Module:
        key = (tuple(w.shape), w.dtype, w.device)
        if key not in self._shells:
            te = _te()
            shell = te.Linear(w.shape[1], w.shape[0], bias=False, params_dtype=w.dtype, device="meta")
            # the weight is supplied per call (a slice of the stacked experts), not owned by the shell
            del shell._parameters["weight"]
            self._shells[key] = shell
        return self._shells[key]

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x.new_zeros(0, w.shape[0])
        shell = self._shell(w)
        shell.__dict__["weight"] = w
        try:
            with te_autocast(self.recipe):
                return shell(x)
        finally:
            shell.__dict__.pop("weight", None)

    def __repr__(self) -> str:
        return f"TEExpertGemm({self.fmt!r})"
