"""Low-precision training: the per-layer format policy (SPEC section 5), Transformer Engine on GPU, emulation
everywhere.

    cfg = PrecisionConfig.from_dict(recipe.precision)        # or PrecisionConfig(name="nvfp4", emulate=True, ...)
    table = apply_precision(model, cfg)                      # in place; raises if this machine cannot run it
    print(format_table(table))                               # one line per GEMM module: format, backend, rule
"""

from .apply import EmulatedLinear, apply_precision
from .config import QUANTIZED_FORMATS, PrecisionConfig, PrecisionConfigError
from .policy import (
    MOE_ALIGNMENT,
    REQUIRED_CAPABILITY,
    TE_RECIPE_NAMES,
    PrecisionEntry,
    PrecisionTable,
    PrecisionUnsupportedError,
    check_support,
    check_te_shapes,
    format_table,
    resolve_policy,
)
from .te_backend import te_available

__all__ = [
    "PrecisionConfig",
    "PrecisionConfigError",
    "PrecisionUnsupportedError",
    "PrecisionEntry",
    "PrecisionTable",
    "EmulatedLinear",
    "apply_precision",
    "resolve_policy",
    "check_support",
    "check_te_shapes",
    "format_table",
    "te_available",
    "QUANTIZED_FORMATS",
    "REQUIRED_CAPABILITY",
    "TE_RECIPE_NAMES",
    "MOE_ALIGNMENT",
]
