"""The precision section of a recipe (Hydra group `precision`, files in recipes/precision/)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from latentforge.kernels.quant import RECIPES
from latentforge.model.errors import UserError

COMPUTE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}

# formats that quantize (everything else runs in the model's own dtype)
QUANTIZED_FORMATS = ("fp8_current", "fp8_delayed", "fp8_block", "mxfp8", "nvfp4")


class PrecisionConfigError(UserError, ValueError):
    """A precision setting that cannot work; the message names the field and the fix."""


@dataclass
class PrecisionConfig:
    """Which GEMM format each layer gets, and how the recipe quantizes.

    Module names are the model's (Hugging Face) names; patterns are shell-style (`fnmatch`, `*` also matches
    dots). Rules apply in this order, the first that matches decides:
      1. `fp32` patterns: never quantised, computed in fp32 (the router);
      2. `never` patterns: never quantised (embedding, lm_head);
      3. `name: bf16`: everything else in high precision too;
      4. `keep_bf16` patterns, `keep_layers` indices, the last `keep_last_layers` backbone layers: high precision;
      5. `mxfp8` patterns: MXFP8;
      6. everything else: `name`.
    """

    name: str = "bf16"  # bf16 | fp8_current | fp8_delayed | fp8_block | mxfp8 | nvfp4
    emulate: bool = False  # quantize in PyTorch (kernels/quant.py, any device) instead of Transformer Engine

    keep_bf16: list = field(default_factory=list)
    keep_last_layers: int = 0
    keep_layers: list = field(default_factory=list)  # backbone layer indices; negative counts from the end
    mxfp8: list = field(default_factory=list)
    fp32: list = field(default_factory=lambda: ["*.gate"])
    never: list = field(default_factory=lambda: ["backbone.embeddings", "lm_head"])

    # recipe options (the Transformer Engine recipe fields of the same meaning)
    fp8_format: str = "hybrid"  # fp8_current / fp8_delayed: hybrid (E4M3 forward, E5M2 gradients) or e4m3
    amax_history_len: int = 1024  # fp8_delayed
    amax_compute_algo: str = "max"  # fp8_delayed: max or most_recent
    margin: int = 0  # fp8_delayed
    nvfp4_rht: bool = True  # 16x16 random Hadamard transform on the wgrad operands
    nvfp4_stochastic_rounding: bool = True  # on gradients
    nvfp4_2d_weights: bool = True  # 16x16 weight blocks
    seed: int = 0  # emulation: seed of the stochastic-rounding generator (on TE, TE's own RNG)

    # mixed precision of everything that is not a quantized GEMM: weights are kept in fp32 (the optimizer's
    # master copy); the forward/backward computes in `param_dtype` (FSDP2 casts the gathered weights, or autocast
    # without FSDP) and gradients are reduced in `reduce_dtype`. "auto": bfloat16 on GPU, float32 on CPU (where
    # the equivalence tests need exact fp32). The MoE router's weight and GEMM stay fp32 (train/parallel/wrapping.py;
    # by module class, not by the `fp32` patterns above, which pick the GEMM formats).
    param_dtype: str = "auto"  # auto | bfloat16 | float32
    reduce_dtype: str = "float32"  # float32 | bfloat16

    def __post_init__(self):
        for name in ("keep_bf16", "keep_layers", "mxfp8", "fp32", "never"):
            value = getattr(self, name)
            if isinstance(value, str) or not hasattr(value, "__iter__"):
                raise PrecisionConfigError(f"precision.{name} must be a list, got {value!r}")
            setattr(self, name, list(value))
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise PrecisionConfigError(message)

        need(
            self.name in RECIPES,
            f"precision.name {self.name!r} is not a precision; choose one of "
            f"{', '.join(RECIPES)} (on the command line: precision=<name>)",
        )
        need(
            self.fp8_format in ("hybrid", "e4m3"),
            f"precision.fp8_format must be 'hybrid' or 'e4m3', got {self.fp8_format!r}",
        )
        need(
            self.amax_compute_algo in ("max", "most_recent"),
            f"precision.amax_compute_algo must be 'max' or 'most_recent', got {self.amax_compute_algo!r}",
        )
        need(self.amax_history_len >= 1, f"precision.amax_history_len must be >= 1, got {self.amax_history_len}")
        need(
            self.param_dtype in COMPUTE_DTYPES or self.param_dtype == "auto",
            f"precision.param_dtype must be auto, bfloat16 or float32, got {self.param_dtype!r}",
        )
        need(
            self.reduce_dtype in COMPUTE_DTYPES,
            f"precision.reduce_dtype must be bfloat16 or float32, got {self.reduce_dtype!r}",
        )
        need(self.keep_last_layers >= 0, f"precision.keep_last_layers must be >= 0, got {self.keep_last_layers}")
        need(
            all(isinstance(i, int) for i in self.keep_layers),
            f"precision.keep_layers must hold layer indices (ints), got {self.keep_layers}",
        )
        for name in ("keep_bf16", "mxfp8", "fp32", "never"):
            need(
                all(isinstance(p, str) for p in getattr(self, name)),
                f"precision.{name} must hold module-name patterns (strings), got {getattr(self, name)}",
            )

    def compute_dtype(self, device_type: str) -> torch.dtype:
        """The dtype the model computes in on this device type (weights stay fp32)."""
        if self.param_dtype == "auto":
            return torch.bfloat16 if device_type == "cuda" else torch.float32
        return COMPUTE_DTYPES[self.param_dtype]

    def gradient_reduce_dtype(self) -> torch.dtype:
        return COMPUTE_DTYPES[self.reduce_dtype]

    def recipe_options(self, fmt: str) -> dict:
        """Keyword options of kernels.quant.make_recipe for one format."""
        if fmt in ("fp8_current",):
            return {"fp8_format": self.fp8_format}
        if fmt == "fp8_delayed":
            return {
                "fp8_format": self.fp8_format,
                "amax_history_len": self.amax_history_len,
                "margin": self.margin,
                "amax_compute_algo": self.amax_compute_algo,
            }
        if fmt == "nvfp4":
            return {
                "rht": self.nvfp4_rht,
                "stochastic_rounding": self.nvfp4_stochastic_rounding,
                "two_d_weights": self.nvfp4_2d_weights,
            }
        return {}

    @classmethod
    def from_dict(cls, values) -> "PrecisionConfig":
        """From a plain dict or the `precision` node of a composed recipe (unknown keys are named)."""
        from latentforge.model.schema import from_dict

        return from_dict(cls, values, "precision", PrecisionConfigError)
