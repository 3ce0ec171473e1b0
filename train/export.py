"""DCP checkpoint -> Hugging Face directory (config.json + safetensors, MTP included, tokenizer copied).

    python -m train.export runs/tiny/checkpoints/step_00000300 out/tiny-hf
    python -m train.export runs/tiny out/tiny-hf            # a run directory: its newest complete checkpoint

Runs in one process on CPU whatever layout wrote the checkpoint: DCP reassembles the full tensors from the shards.
The checkpoint directory carries `model_config.json` (and `tokenizer.json` when the run used a file-based
tokenizer), written by the trainer before the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import torch
import torch.distributed.checkpoint as dcp

from .checkpoint import quiet_single_process, latest_checkpoint

MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory, or a run directory / checkpoints folder -> its newest complete checkpoint."""
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, ".metadata")):
        return path
    for folder in (os.path.join(path, "checkpoints"), path):
        found = latest_checkpoint(folder)
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete DCP checkpoint at {path} (expected a step_XXXXXXXX directory with a "
                            ".metadata file, or a run directory holding checkpoints/)")


def load_model_from_checkpoint(path: str):
    """The plain `HybridModel` (CPU, fp32) with the weights of a DCP checkpoint written by the trainer."""
    from model import HybridModel, ModelConfig

    path = resolve_checkpoint(path)
    config_file = os.path.join(path, MODEL_CONFIG_FILE)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{config_file} is missing: this checkpoint was not written by train/pretrain.py")
    with open(config_file) as f:
        cfg = ModelConfig.from_dict(json.load(f))
    with torch.device("meta"):
        model = HybridModel(cfg)
    model = model.to_empty(device="cpu")  # every tensor is overwritten by the load below
    state = {"model": model.state_dict()}
    with quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=True)
    model.load_state_dict(state["model"])
    return model


def export_checkpoint(checkpoint: str, out_dir: str, dtype: torch.dtype = torch.float32) -> str:
    from model import hf

    checkpoint = resolve_checkpoint(checkpoint)
    model = load_model_from_checkpoint(checkpoint)
    hf.save_pretrained(model, out_dir, dtype=dtype)
    tokenizer = os.path.join(checkpoint, TOKENIZER_FILE)
    if os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(out_dir, TOKENIZER_FILE))
    return out_dir


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a step_XXXXXXXX checkpoint directory, or a run directory")
    parser.add_argument("out_dir", help="where the Hugging Face files go")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint)
    export_checkpoint(checkpoint, args.out_dir, dtype=DTYPES[args.dtype])
    print(f"exported {checkpoint} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
