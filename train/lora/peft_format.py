"""Adapters on disk in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Keys are `base_model.model.<Hugging Face module name>.lora_{A,B}.weight` with the names of SPEC section 4
(`backbone.layers.{i}.mixer.q_proj`); transformers >= 5 maps `backbone.` to its `model.` when PEFT loads them.

Routed experts use PEFT's parameter-adapter layout (`target_parameters`), which wraps `experts` once per targeted
parameter, `up_proj` innermost:
    experts.base_layer.lora_A.weight  (E*r, in)  up_proj     row e*r + j     = A_e[j]
    experts.base_layer.lora_B.weight  (out, r*E) up_proj     column j*E + e  = B_e[:, j]
    experts.lora_{A,B}.weight                    down_proj   same layout
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from .apply import apply_lora, lora_modules
from .config import LoRAConfig, LoRAConfigError
from .layers import EXPERT_PROJS, LoRAExpertsMixin, LoRALinearMixin

CONFIG_FILE = "adapter_config.json"
BASE_EXPORT_DIR = "base_hf"  # next to the adapter directory: the Hugging Face export of a DCP base
BASE_SOURCE_FILE = "latentforge_source.json"  # in it: the DCP checkpoint it was exported from
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
StrPath = Union[str, "os.PathLike[str]"]  # a directory, as a string or a Path
EXPERT_WRAPPER = {"up_proj": "base_layer.", "down_proj": ""}  # both targeted: up_proj is the inner wrapper


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (a collective for DTensors: every rank holding a shard must call it)."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True).contiguous()


def _peft_target_name(name: str) -> str:
    # without the leading `backbone.`: as a PEFT target (a dot-boundary suffix) it matches both our names and
    # transformers' `model.layers...`
    return name.removeprefix("backbone.")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{PEFT key: full CPU tensor} of this model's adapters (collective under FSDP / TP: call on every rank)."""
    out = {}
    for name, module in lora_modules(model).items():
        if isinstance(module, LoRALinearMixin):
            out[f"{PREFIX}{name}.lora_A.weight"] = _full(module.lora_A)
            out[f"{PREFIX}{name}.lora_B.weight"] = _full(module.lora_B)
        elif isinstance(module, LoRAExpertsMixin):
            for proj in EXPERT_PROJS:
                a, b = _full(getattr(module, f"lora_A_{proj}")), _full(getattr(module, f"lora_B_{proj}"))
                experts, rank, _ = a.shape
                key = f"{PREFIX}{name}.{EXPERT_WRAPPER[proj]}"
                out[key + "lora_A.weight"] = a.reshape(experts * rank, -1)
                out[key + "lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], rank * experts).contiguous()
    return out


def gather_lora_state_dict(model_parts: Sequence[nn.Module]) -> Optional[dict[str, torch.Tensor]]:
    """The adapters of every rank's model parts (pipeline stages own different layers), on rank 0; None elsewhere.
    Collective over the world; each tensor travels once (from the lowest rank holding it)."""
    import torch.distributed as dist

    local: dict[str, torch.Tensor] = {}
    for part in model_parts:
        local.update(lora_state_dict(part))
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    key_lists: list[list[str]] = [[] for _ in range(dist.get_world_size())]  # all_gather_object fills them
    dist.all_gather_object(key_lists, sorted(local))
    owner: dict[str, int] = {}
    for rank, keys in enumerate(key_lists):
        for key in keys:
            owner.setdefault(key, rank)
    me = dist.get_rank()
    mine = {k: v for k, v in local.items() if owner[k] == me}
    if me != 0:
        dist.gather_object(mine, None, dst=0)
        return None
    gathered: list[dict[str, torch.Tensor]] = [{} for _ in range(dist.get_world_size())]  # gather_object fills them
    dist.gather_object(mine, gathered, dst=0)
    merged: dict[str, torch.Tensor] = {}
    for piece in gathered:
        merged.update(piece)
    return merged


def _adapted_modules(tensors: dict[str, torch.Tensor]) -> tuple[list[str], bool]:
    """(Linear module names, whether routed experts are adapted) from PEFT keys."""
    linears: set[str] = set()
    experts = False
    for key in tensors:
        module = key.removeprefix(PREFIX).rsplit(".lora_", 1)[0]
        if module.endswith("mixer.experts") or module.endswith("mixer.experts.base_layer"):
            experts = True
        else:
            linears.add(module)
    return sorted(linears), experts


def adapter_config(
    tensors: dict[str, torch.Tensor], cfg: LoRAConfig, base_model_name_or_path: Optional[str] = None
) -> dict[str, Any]:
    """PEFT's LoraConfig fields for these adapter tensors (exact module names, so nothing else matches)."""
    linears, has_experts = _adapted_modules(tensors)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": [_peft_target_name(n) for n in linears],
        "target_parameters": [f"experts.{p}" for p in EXPERT_PROJS] if has_experts else None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def hf_base_of(base: StrPath, adapter_dir: StrPath) -> str:
    """What `base_model_name_or_path` records for the base at `base` (a Hugging Face directory, a DCP checkpoint
    or run directory, or a hub name), so `AutoPeftModelForCausalLM.from_pretrained(adapter_dir)` finds it: a
    directory's absolute path; for a DCP checkpoint, a Hugging Face export of it written next to the adapter
    (`<adapter_dir>/../base_hf`). An export of the same checkpoint already there, one level up or in a sibling
    folder (an SFT run's `best/base_hf` for its final `adapter`) is reused instead."""
    from .checkpoint import export_base, is_hf_directory, resolve_source

    if not os.path.exists(str(base)):
        return str(base)  # a hub model name: transformers resolves it
    kind, source = resolve_source(str(base))
    if kind == "hf":
        return source
    parent = Path(adapter_dir).resolve().parent
    wanted = {"dcp": str(source)}
    for candidate in [
        parent / BASE_EXPORT_DIR,
        parent.parent / BASE_EXPORT_DIR,
        *sorted(parent.glob(f"*/{BASE_EXPORT_DIR}")),
    ]:
        marker = candidate / BASE_SOURCE_FILE
        if is_hf_directory(str(candidate)) and marker.is_file() and json.loads(marker.read_text()) == wanted:
            return str(candidate)
    out = parent / BASE_EXPORT_DIR
    export_base(str(source), str(out))
    (out / BASE_SOURCE_FILE).write_text(json.dumps(wanted) + "\n")
    return str(out)


def write_adapter(
    tensors: dict[str, torch.Tensor], path: StrPath, cfg: LoRAConfig, base_model_name_or_path: Optional[str] = None
) -> Path:
    """The PEFT directory; `base_model_name_or_path` may be a DCP checkpoint: see `hf_base_of`."""
    if not tensors:
        raise ValueError("no LoRA adapter tensors: nothing to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    if base_model_name_or_path is not None:
        base_model_name_or_path = hf_base_of(base_model_name_or_path, path)
    config = adapter_config(tensors, cfg, base_model_name_or_path)
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return path


def save_adapter(
    model_or_parts: nn.Module | list[nn.Module] | tuple[nn.Module, ...],
    path: StrPath,
    cfg: LoRAConfig,
    base_model_name_or_path: Optional[str] = None,
) -> Optional[Path]:
    """Write the PEFT adapter directory of a model (or of a runner's model parts). Collective when distributed:
    every rank calls it; rank 0 writes and returns the path, the others return None."""
    parts = list(model_or_parts) if isinstance(model_or_parts, (list, tuple)) else [model_or_parts]
    tensors = gather_lora_state_dict(parts)
    if tensors is None:
        return None
    return write_adapter(tensors, path, cfg, base_model_name_or_path)


# ----- loading ---------------------------------------------------------------------------------------------------
def config_from_peft(peft: dict[str, Any]) -> LoRAConfig:
    """Our LoRAConfig from a PEFT adapter_config.json (ours, or one PEFT wrote for NemotronH)."""
    if peft.get("peft_type", "LORA") != "LORA":
        raise LoRAConfigError(f"adapter is {peft.get('peft_type')}, only LORA adapters load here")
    for unsupported in ("rank_pattern", "alpha_pattern"):
        if peft.get(unsupported):
            raise LoRAConfigError(f"adapter_config.json sets {unsupported} (per-module ranks): not supported")
    if peft.get("use_dora") or peft.get("bias", "none") != "none" or peft.get("modules_to_save"):
        raise LoRAConfigError("adapter uses DoRA, LoRA biases or modules_to_save: not supported")
    targets = peft.get("target_modules") or []
    if isinstance(targets, str):
        raise LoRAConfigError(
            f"target_modules is the string {targets!r} (a regex or 'all-linear'): only a list of "
            "module names loads here; save the adapter with the list of modules it adapts"
        )
    params = sorted(peft.get("target_parameters") or [])
    if params and params != sorted(f"experts.{p}" for p in EXPERT_PROJS):
        raise LoRAConfigError(
            f"target_parameters {params}: only both routed-expert projections "
            f"{[f'experts.{p}' for p in EXPERT_PROJS]} together are supported"
        )
    return LoRAConfig(
        rank=int(peft["r"]),
        alpha=float(peft["lora_alpha"]),
        dropout=float(peft.get("lora_dropout", 0)),
        use_rslora=bool(peft.get("use_rslora", False)),
        targets=list(targets),
        routed_experts=bool(params),
        include_mtp=any(str(t).startswith("mtp.") for t in targets),
    )


def _our_name(key: str) -> str:
    key = key.removeprefix(PREFIX)
    if key.startswith("model."):  # written by PEFT on transformers' NemotronH
        key = "backbone." + key[len("model.") :]
    return key


@torch.no_grad()
def load_adapter_weights(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy PEFT-layout tensors into the adapters already on `model`; every adapter must be covered."""
    expected = {}
    for name, module in lora_modules(model).items():
        if isinstance(module, LoRALinearMixin):
            expected[f"{name}.lora_A.weight"] = (module.lora_A, None)
            expected[f"{name}.lora_B.weight"] = (module.lora_B, None)
        else:
            for proj in EXPERT_PROJS:
                key = f"{name}.{EXPERT_WRAPPER[proj]}"
                expected[key + "lora_A.weight"] = (getattr(module, f"lora_A_{proj}"), "A")
                expected[key + "lora_B.weight"] = (getattr(module, f"lora_B_{proj}"), "B")
    given = {_our_name(k): v for k, v in tensors.items()}
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter weights do not match the adapted modules: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}. Was the adapter trained on this model's configuration?"
        )
    for key, (param, kind) in expected.items():
        value = given[key]
        if kind == "A":  # (E*r, in) -> (E, r, in)
            value = value.reshape(param.shape)
        elif kind == "B":  # (out, r*E), column j*E + e -> (E, out, r)
            experts, out, rank = param.shape
            value = value.reshape(out, rank, experts).permute(2, 0, 1)
        if value.shape != param.shape:
            raise ValueError(
                f"{key}: adapter tensor has shape {tuple(value.shape)}, the model expects "
                f"{tuple(param.shape)} (a different rank or model size)"
            )
        param.copy_(value.to(param.dtype))


def read_adapter(path: StrPath) -> tuple[dict, dict[str, torch.Tensor]]:
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    return json.loads((path / CONFIG_FILE).read_text()), load_file(str(path / WEIGHTS_FILE))


def load_adapter(model: nn.Module, path: StrPath, base_dtype: Optional[str] = None) -> LoRAConfig:
    """Put the adapter saved at `path` on a plain (un-adapted, unparallelised) model; returns its config."""
    peft, tensors = read_adapter(path)
    cfg = config_from_peft(peft)
    cfg.base_dtype = base_dtype
    apply_lora(model, cfg, warn_peft=False)  # the adapter exists already: warnings were for its training
    load_adapter_weights(model, tensors)
    return cfg
