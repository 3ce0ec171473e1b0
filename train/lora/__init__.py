"""LoRA adapters on the hybrid model, saved and loaded in PEFT's layout (see docs in each module).

cfg = LoRAConfig(rank=8, alpha=16)
apply_lora(model, cfg)                 # adapters on by name pattern, base frozen; before parallelisation
runner = build_runner(model, ...)      # TP slicing of the adapters and EP sharding of expert adapters: automatic
save_adapter(model, "out/adapter", cfg)  # adapter_config.json + adapter_model.safetensors (PEFT, vLLM)
load_adapter(model, "out/adapter")     # onto a plain model
merge_lora(model); hf.save_pretrained(model, "out/merged")
"""

from .apply import (
    apply_lora,
    find_targets,
    freeze_base,
    lora_modules,
    lora_parameters,
    merge_lora,
    peft_refused,
    remove_lora,
)
from .config import DEFAULT_TARGETS, PEFT_REFUSED, LoRAConfig, LoRAConfigError, PEFTCompatibilityWarning
from .layers import tensor_parallel_adapters
from .peft_format import (
    adapter_config,
    gather_lora_state_dict,
    load_adapter,
    lora_state_dict,
    read_adapter,
    save_adapter,
    write_adapter,
)

__all__ = [
    "DEFAULT_TARGETS",
    "PEFT_REFUSED",
    "LoRAConfig",
    "LoRAConfigError",
    "PEFTCompatibilityWarning",
    "adapter_config",
    "apply_lora",
    "find_targets",
    "freeze_base",
    "gather_lora_state_dict",
    "load_adapter",
    "lora_modules",
    "lora_parameters",
    "lora_state_dict",
    "merge_lora",
    "peft_refused",
    "read_adapter",
    "remove_lora",
    "save_adapter",
    "tensor_parallel_adapters",
    "write_adapter",
]
