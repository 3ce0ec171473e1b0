"""Which format each GEMM of the model gets (the policy), whether this machine can run it, and the report."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Iterable, Iterator, Optional, Protocol, TypeGuard

import torch
from torch import nn

from .config import QUANTIZED_FORMATS, PrecisionConfig, PrecisionConfigError
from latentforge.kernels.moe import LinearFn
from latentforge.model.errors import UserError

# Transformer Engine recipe behind each format, and the compute capability it needs (SPEC section 5)
TE_RECIPE_NAMES = {
    "fp8_current": "Float8CurrentScaling",
    "fp8_delayed": "DelayedScaling",
    "fp8_block": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
    "nvfp4": "NVFP4BlockScaling",
}
REQUIRED_CAPABILITY = {
    "fp8_current": (9, 0),
    "fp8_delayed": (9, 0),
    "fp8_block": (9, 0),
    "mxfp8": (10, 0),
    "nvfp4": (10, 0),
}
# rows per expert the grouped GEMMs need (SPEC section 5)
MOE_ALIGNMENT = {"nvfp4": 128, "mxfp8": 32, "fp8_current": 16, "fp8_delayed": 16, "fp8_block": 16}

_BACKBONE_LAYER = re.compile(r"^backbone\.layers\.(\d+)(\.|$)")


class PrecisionUnsupportedError(UserError, RuntimeError):
    """The requested precision cannot run here; the message names the requirement and the alternatives."""


@dataclass
class PrecisionEntry:
    name: str  # module name (the experts entry stands for its stacked up_proj and down_proj GEMMs)
    kind: str  # linear | experts | embedding | router
    shape: tuple[int, ...]
    dtype: str  # parameter dtype (checkpoints keep it: quantization happens on the fly)
    format: str  # nvfp4 | mxfp8 | fp8_current | fp8_delayed | fp8_block | bf16 | fp32
    rule: str  # the policy rule that decided
    backend: str = "torch"  # te | emulated | torch (not quantized)
    numel: int = 0
    alignment: Optional[int] = None  # experts: rows per expert padded to this

    @property
    def quantized(self) -> bool:
        return self.format in QUANTIZED_FORMATS


@dataclass
class PrecisionTable:
    precision: str
    emulate: bool
    entries: list[PrecisionEntry] = field(default_factory=list)

    def __iter__(self) -> Iterator[PrecisionEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def by_name(self) -> dict[str, PrecisionEntry]:
        return {e.name: e for e in self.entries}

    def formats(self) -> set[str]:
        return {e.format for e in self.entries}

    def counts(self) -> Counter[str]:
        return Counter(e.format for e in self.entries)


class StackedExperts(Protocol):
    """What the policy reads and apply_precision sets on routed experts (model/moe.py's Experts, LoRA's subclass)."""

    up_proj: torch.Tensor
    down_proj: torch.Tensor
    linear_fn: Optional[LinearFn]
    alignment: int


def is_experts(module: nn.Module) -> TypeGuard[StackedExperts]:
    """The stacked routed experts of model/moe.py (up (E, I, D), down (E, D, I), a `linear_fn` hook)."""
    up, down = getattr(module, "up_proj", None), getattr(module, "down_proj", None)
    return (
        isinstance(up, nn.Parameter)
        and isinstance(down, nn.Parameter)
        and up.dim() == 3
        and hasattr(module, "linear_fn")
    )


def backbone_layer_index(name: str) -> Optional[int]:
    match = _BACKBONE_LAYER.match(name)
    return int(match.group(1)) if match else None


def count_backbone_layers(model: nn.Module) -> int:
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    if layers is not None:
        return len(layers)
    indices = [backbone_layer_index(n) for n, _ in model.named_modules()]
    indices = [i for i in indices if i is not None]
    return max(indices) + 1 if indices else 0


def _first_match(name: str, patterns: Iterable[str]) -> Optional[str]:
    for p in patterns:
        if fnmatchcase(name, p):
            return p
    return None


def _targets(model: nn.Module, cfg: PrecisionConfig) -> Iterator[tuple[str, str, torch.Tensor, int]]:
    """(name, kind, weight, parameters) of every module that owns a GEMM (or is named by a fp32/never rule), in
    model order; experts: the weight is up_proj, the parameters count down_proj too."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear):
            yield name, "linear", module.weight, module.weight.numel()
        elif is_experts(module):
            yield name, "experts", module.up_proj, module.up_proj.numel() + module.down_proj.numel()
        elif isinstance(module, nn.Embedding):
            yield name, "embedding", module.weight, module.weight.numel()
        elif (_first_match(name, cfg.fp32) or _first_match(name, cfg.never)) and isinstance(weight, nn.Parameter):
            yield name, "router", weight, weight.numel()


def resolve_policy(model: nn.Module, cfg: PrecisionConfig) -> PrecisionTable:
    """Decide the format of every GEMM module (pure: the model is not changed)."""
    n_layers = count_backbone_layers(model)
    kept_layers = set()
    if cfg.name != "bf16" and n_layers:
        if cfg.keep_last_layers >= n_layers:
            raise PrecisionConfigError(
                f"precision.keep_last_layers={cfg.keep_last_layers} keeps all {n_layers} layers of this model in "
                f"high precision, so nothing would run {cfg.name}; set precision.keep_last_layers below "
                f"{n_layers} (the real run keeps the last 14 of 88, about 1/6)"
            )
        kept_layers.update(range(n_layers - cfg.keep_last_layers, n_layers))
        for i in cfg.keep_layers:
            if not -n_layers <= i < n_layers:
                raise PrecisionConfigError(f"precision.keep_layers has {i}, but the model has {n_layers} layers")
            kept_layers.add(i % n_layers)

    table = PrecisionTable(cfg.name, cfg.emulate)
    for name, kind, param, numel in _targets(model, cfg):
        shape = tuple(param.shape)
        layer = backbone_layer_index(name)
        if p := _first_match(name, cfg.fp32):
            fmt, rule = "fp32", f"fp32 '{p}'"
        elif p := _first_match(name, cfg.never):
            fmt, rule = "bf16", f"never '{p}'"
        elif kind in ("embedding", "router"):
            fmt, rule = "bf16", "not a GEMM"
        elif cfg.name == "bf16":
            fmt, rule = "bf16", "precision=bf16"
        elif p := _first_match(name, cfg.keep_bf16):
            fmt, rule = "bf16", f"keep_bf16 '{p}'"
        elif layer is not None and layer in kept_layers:
            in_last = layer >= n_layers - cfg.keep_last_layers
            fmt, rule = "bf16", (f"last {cfg.keep_last_layers} layers" if in_last else "keep_layers")
        elif p := _first_match(name, cfg.mxfp8):
            fmt, rule = "mxfp8", f"mxfp8 '{p}'"
        else:
            fmt, rule = cfg.name, "recipe"
        dtype = str(param.dtype).replace("torch.", "")
        table.entries.append(PrecisionEntry(name, kind, shape, dtype, fmt, rule, numel=numel))
    return table


def detect_capability() -> Optional[tuple[int, int]]:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return major, minor


def check_support(
    table_or_formats: PrecisionTable | Iterable[str],
    *,
    emulate: bool,
    device_capability: Optional[tuple[int, int]],
    te_available: bool,
) -> None:
    """Raise PrecisionUnsupportedError when a format the policy uses cannot run on this machine.

    Pure: `device_capability` is (major, minor) or None (no CUDA device); `te_available` says whether
    Transformer Engine imports. Emulation runs everywhere.
    """
    if isinstance(table_or_formats, PrecisionTable):
        examples = {}
        for e in table_or_formats:
            examples.setdefault(e.format, []).append(e.name)
        formats = set(examples)
    else:
        formats, examples = set(table_or_formats), {}
    needed = sorted(
        (f for f in formats if f in REQUIRED_CAPABILITY), key=lambda f: (REQUIRED_CAPABILITY[f], f), reverse=True
    )
    if emulate or not needed:
        return

    def what(fmt: str) -> str:
        names = examples.get(fmt, [])
        where = f" ({len(names)} modules, e.g. {names[0]})" if names else ""
        return f"{fmt} (Transformer Engine {TE_RECIPE_NAMES[fmt]}){where}"

    listing = "; ".join(what(f) for f in needed)
    if not te_available:
        raise PrecisionUnsupportedError(
            f"this precision policy uses {listing}, which runs on Transformer Engine, and Transformer Engine is not "
            "installed. Install the GPU extra on a CUDA machine (pip install -e .[gpu]), or set "
            "precision.emulate=true to run the same quantization in PyTorch (any device, slower)."
        )
    if device_capability is None:
        raise PrecisionUnsupportedError(
            f"this precision policy uses {listing}, which needs a CUDA GPU and none is visible. Run on a GPU "
            "(compute capability >= 9.0 for FP8, >= 10.0 for MXFP8/NVFP4), or set precision.emulate=true."
        )
    cap = tuple(device_capability)
    for fmt in needed:
        need = REQUIRED_CAPABILITY[fmt]
        if cap < need:
            fp8_ok = [f for f in ("fp8_current", "fp8_delayed", "fp8_block") if cap >= REQUIRED_CAPABILITY[f]]
            offer = (
                f"pick an FP8 recipe this GPU runs (precision={'|'.join(fp8_ok)}, with no mxfp8 overrides), "
                if fp8_ok
                else ""
            )
            raise PrecisionUnsupportedError(
                f"{what(fmt)} needs compute capability >= {need[0]}.{need[1]} "
                f"({'Blackwell' if need >= (10, 0) else 'Hopper'}); this GPU has {cap[0]}.{cap[1]}. "
                f"Either {offer}or set precision.emulate=true to emulate {fmt} in PyTorch (slow)."
            )


def _shape_text(e: PrecisionEntry) -> str:
    if e.kind == "experts":  # (E, I, D): E experts of up (I x D) and down (D x I)
        n, i, d = e.shape
        return f"{n}x({i}x{d}, {d}x{i})"
    return "x".join(map(str, e.shape))


def check_te_shapes(table: PrecisionTable, multiple: int = 16) -> None:
    """Transformer Engine's quantized GEMMs need both feature dims divisible by 16: name the modules that aren't."""
    bad = []
    for e in table:
        if not e.quantized:
            continue
        dims = e.shape[1:] if e.kind == "experts" else e.shape
        if any(d % multiple for d in dims):
            bad.append(f"{e.name} {_shape_text(e)}")
    if bad:
        raise PrecisionUnsupportedError(
            f"Transformer Engine needs GEMM feature dims divisible by {multiple}; these quantized modules are not: "
            f"{'; '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Keep them in high precision "
            "(precision.keep_bf16 patterns), change the model sizes, or set precision.emulate=true."
        )


def format_table(table: PrecisionTable) -> str:
    """The start-of-run report: one line per GEMM module with its format and the rule that chose it."""
    entries = list(table)
    backend = "emulated (kernels/quant.py)" if table.emulate else "Transformer Engine"
    if not any(e.quantized for e in entries):
        backend = "high precision"
    head = f"precision {table.precision} [{backend}]"
    cols = ("module", "kind", "shape", "dtype", "format", "backend", "rule")
    rows = []
    for e in entries:
        rule = e.rule + (f", {e.alignment} rows/expert" if e.alignment else "")
        rows.append((e.name, e.kind, _shape_text(e), e.dtype, e.format, e.backend, rule))
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]

    def line(values: Iterable[str]) -> str:
        return "  ".join(v.ljust(w) for v, w in zip(values, widths)).rstrip()

    total = sum(e.numel for e in entries) or 1
    share = Counter()
    for e in entries:
        share[e.format] += e.numel
    summary = ", ".join(
        f"{fmt} {table.counts()[fmt]} modules / {100.0 * n / total:.1f}% of params"
        for fmt, n in sorted(share.items(), key=lambda kv: -kv[1])
    )
    out = [head, line(cols), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    out.append(f"summary: {summary}")
    return "\n".join(out)
