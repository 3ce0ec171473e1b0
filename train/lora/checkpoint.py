"""Models with adapters from files: a Hugging Face directory or a DCP checkpoint (train/pretrain.py, train/sft.py),
optionally with a PEFT adapter directory; the merged Hugging Face export.

A DCP checkpoint of a LoRA run holds the frozen base and the adapters under one state dict (`...q_proj.weight`,
`...q_proj.lora_A`); its `lora_config.json` (written next to the shards) says how to rebuild the adapters.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Optional, Tuple

import torch
from torch import nn

from .apply import apply_lora, merge_lora
from .config import LoRAConfig
from .peft_format import load_adapter

if TYPE_CHECKING:
    from latentforge.model import HybridModel, ModelConfig

LORA_CONFIG_FILE = "lora_config.json"
TOKENIZER_FILE = "tokenizer.json"


def is_hf_directory(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        name.endswith(".safetensors") for name in os.listdir(path)
    )


def resolve_source(path: str) -> Tuple[str, str]:
    """("hf", directory) or ("dcp", checkpoint directory) for a Hugging Face directory, a DCP checkpoint or a run
    directory (its newest complete checkpoint)."""
    from latentforge.train.export import resolve_checkpoint

    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path) and is_hf_directory(path):
        return "hf", path
    try:
        return "dcp", resolve_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} is neither a Hugging Face directory (config.json + *.safetensors) nor a DCP checkpoint / run "
            "directory written by train/pretrain.py or train/sft.py"
        ) from None


def model_config_of(path: str) -> ModelConfig:
    """The ModelConfig stored with a Hugging Face directory or a DCP checkpoint."""
    from latentforge.model import ModelConfig
    from latentforge.model.hf import from_hf_config
    from latentforge.train.export import MODEL_CONFIG_FILE

    kind, path = resolve_source(path)
    if kind == "hf":
        with open(os.path.join(path, "config.json")) as f:
            return from_hf_config(json.load(f))
    config_file = os.path.join(path, MODEL_CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"{config_file} is missing: this checkpoint was not written by train/pretrain.py or train/sft.py"
        )
    with open(config_file) as f:
        return ModelConfig.from_dict(json.load(f))


def lora_config_of(checkpoint: str) -> Optional[LoRAConfig]:
    """The LoRA settings a DCP checkpoint was trained with (None: no adapters in it)."""
    path = os.path.join(checkpoint, LORA_CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return LoRAConfig.from_dict(json.load(f))


@torch.no_grad()
def load_base_weights(model: nn.Module, path: str) -> None:
    """Overwrite `model`'s weights (a plain, unparallelised model without adapters) with those at `path`.

    A Hugging Face directory may lack `mtp.*` (transformers drops them): the MTP block then keeps its values.
    """
    kind, path = resolve_source(path)
    expected = model.state_dict()
    if kind == "hf":
        from latentforge.model.hf import from_hf_tensors, read_tensors

        state = from_hf_tensors(read_tensors(path))
        missing = sorted(k for k in set(expected) - set(state) if not k.startswith("mtp."))
        unexpected = sorted(set(state) - set(expected))
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemReader

        stored = {
            k.removeprefix("model.")
            for k in FileSystemReader(path).read_metadata().state_dict_metadata
            if k.startswith("model.")
        }
        missing, unexpected = sorted(set(expected) - stored), []
        state = {k: v for k, v in expected.items() if k in stored}
        if not missing:
            box = {"model": state}
            dcp.load(box, checkpoint_id=path, no_dist=True)
            state = box["model"]
    if missing or unexpected:
        raise ValueError(
            f"the starting checkpoint {path} does not fit the model: missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
            f"{'...' if len(unexpected) > 6 else ''}"
        )
    for name, value in state.items():
        expected[name].copy_(value)


def load_base_model(source: str) -> HybridModel:
    """The plain `HybridModel` (CPU, fp32) with the base weights at `source` (a LoRA checkpoint's adapters left out)."""
    from latentforge.model import HybridModel

    _, path = resolve_source(source)
    with torch.device("meta"):
        model = HybridModel(model_config_of(path))
    model = model.to_empty(device="cpu")
    model.init_weights()  # MTP of a transformers-written checkpoint keeps a defined value
    load_base_weights(model, path)
    return model


def export_base(source: str, out_dir: str, tokenizer: Optional[str] = None) -> str:
    """The base at `source` (a plain or LoRA DCP checkpoint) as a Hugging Face directory with its tokenizer files."""
    from latentforge.data.hf_tokenizer import export_checkpoint_tokenizer
    from latentforge.model.hf import save_pretrained

    save_pretrained(load_base_model(source), out_dir)
    export_checkpoint_tokenizer(resolve_source(source)[1], out_dir, tokenizer)
    return out_dir


def load_model(source: str, adapter: Optional[str] = None) -> Tuple[HybridModel, Optional[LoRAConfig]]:
    """A plain `HybridModel` (CPU, fp32) from `source`, with its adapters on (not merged) when it has any:
    those trained into a DCP checkpoint of a LoRA run, or the PEFT directory `adapter`."""
    import torch.distributed.checkpoint as dcp

    kind, path = resolve_source(source)
    model = load_base_model(path)
    lora_cfg = lora_config_of(path) if kind == "dcp" else None
    if lora_cfg is not None:
        if adapter is not None:
            raise ValueError(
                f"{path} already holds trained adapters ({LORA_CONFIG_FILE}); pass its starting "
                "checkpoint as the source to apply another adapter"
            )
        lora_cfg.base_dtype = None  # evaluation and merging run in fp32 whatever the training held the base in
        apply_lora(model, lora_cfg, warn_peft=False)
        box = {"model": {k: v for k, v in model.state_dict().items() if ".lora_" in k}}
        dcp.load(box, checkpoint_id=path, no_dist=True)
        model.load_state_dict(box["model"], strict=False)
    elif adapter is not None:
        lora_cfg = load_adapter(model, adapter)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), lora_cfg


def export_merged(
    source: str,
    out_dir: str,
    adapter: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    tokenizer: Optional[str] = None,
) -> str:
    """Fold the adapters into the base and write a full Hugging Face checkpoint with the tokenizer files of
    data/hf_tokenizer.py (`tokenizer`: a spec when the source records none)."""
    from latentforge.data.hf_tokenizer import export_checkpoint_tokenizer
    from latentforge.model import hf

    model, lora_cfg = load_model(source, adapter)
    if lora_cfg is None:
        raise ValueError(
            f"{source} carries no adapters and no --adapter was given: nothing to merge "
            "(python -m latentforge.train.export exports a plain checkpoint)"
        )
    merge_lora(model)
    hf.save_pretrained(model, out_dir, dtype=dtype)
    export_checkpoint_tokenizer(resolve_source(source)[1], out_dir, tokenizer)
    return out_dir
