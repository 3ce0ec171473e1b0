"""DCP checkpoint -> Hugging Face directory, for any trainer checkpoint (plain or LoRA).

    python -m latentforge.model.hf export runs/tiny out/tiny-hf            # a plain checkpoint (the model's own CLI)
    python -m latentforge.train.export runs/lora_tiny out/lora-merged-hf    # also a LoRA run: adapters merged into the base

A plain checkpoint goes through model.hf's DCP reader; a LoRA checkpoint (`lora_config.json` next to the shards)
through train.lora's merge, so an export never silently drops trained adapters.
"""

from __future__ import annotations

import argparse
import sys

import torch

from latentforge.model.errors import entry_point

from latentforge.model.hf import (
    DTYPES,
    LORA_CONFIG_FILE,
    MODEL_CONFIG_FILE,
    TOKENIZER_FILE,
    export_dcp_checkpoint,
    load_dcp_checkpoint,
)
from latentforge.model.hf import resolve_checkpoint as _resolve
from latentforge.model.hybrid import HybridModel

__all__ = [
    "MODEL_CONFIG_FILE",
    "TOKENIZER_FILE",
    "resolve_checkpoint",
    "load_model_from_checkpoint",
    "export_checkpoint",
    "main",
]


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory / checkpoints folder -> its newest complete checkpoint."""
    return str(_resolve(path))


def load_model_from_checkpoint(path: str) -> HybridModel:
    """The plain `HybridModel` (CPU, fp32) with the weights of a DCP checkpoint written by a trainer; a LoRA
    checkpoint's adapters are merged into its base."""
    checkpoint = _resolve(path)
    if (checkpoint / LORA_CONFIG_FILE).is_file():
        from latentforge.train.lora import merge_lora
        from latentforge.train.lora.checkpoint import load_model

        model, _ = load_model(str(checkpoint))
        merged = merge_lora(model)
        assert isinstance(merged, HybridModel)  # merging folds the adapters into the base model in place
        return merged
    return load_dcp_checkpoint(checkpoint)


def export_checkpoint(
    checkpoint: str, out_dir: str, dtype: torch.dtype = torch.float32, tokenizer: str | None = None
) -> str:
    """A Hugging Face directory that stands alone (weights, tokenizer files, chat template, generation config);
    `tokenizer`: a tokenizer spec when the checkpoint records none (tekken runs record theirs in config.yaml)."""
    if (_resolve(checkpoint) / LORA_CONFIG_FILE).is_file():
        from latentforge.train.lora.checkpoint import export_merged

        return str(export_merged(checkpoint, out_dir, dtype=dtype, tokenizer=tokenizer))
    return str(export_dcp_checkpoint(checkpoint, out_dir, dtype=dtype, tokenizer=tokenizer))


@entry_point("latentforge-export")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m latentforge.train.export", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("checkpoint", help="a step_XXXXXXXX checkpoint directory, or a run directory")
    parser.add_argument("out_dir", help="where the Hugging Face files go")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer spec (tekken, bpe:4096, path/tokenizer.json) when the checkpoint records none",
    )
    args = parser.parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint)
    export_checkpoint(checkpoint, args.out_dir, dtype=DTYPES[args.dtype], tokenizer=args.tokenizer)
    print(f"exported {checkpoint} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
