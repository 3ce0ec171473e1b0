"""Hugging Face interop: `NemotronHForCausalLM` checkpoints (config.json + safetensors shards, SPEC section 4).

    save_pretrained(model, path)  -> config.json in NemotronHConfig form, per-expert tensor names, MTP included
    load_pretrained(path)         -> HybridModel (ours, or a checkpoint saved by transformers)

Our state dict already uses the checkpoint's names; only the routed experts differ: stacked (E, out, in) here,
`experts.{e}.up_proj.weight` per expert in the checkpoint. transformers >= 5 reads `backbone.` as `model.` and may
save stacked experts: both spellings load.
"""

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import UserError
from .hybrid import HybridModel
from .manifest import MANIFEST_FILE, read_dcp_metadata, verify_checkpoint

KIND_TO_HF = {"mamba": "linear_attention", "attention": "full_attention", "moe": "moe", "mlp": "mlp"}
HF_TO_KIND = {v: k for k, v in KIND_TO_HF.items()}
INDEX_FILE = "model.safetensors.index.json"
STACKED_EXPERTS = re.compile(r"^(.*\.mixer\.experts)\.(up_proj|down_proj)$")
PER_EXPERT = re.compile(r"^(.*\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


# ----- config ------------------------------------------------------------------------------------------------
def to_hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "torch_dtype": str(dtype).removeprefix("torch."),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "layers_block_type": [KIND_TO_HF[k] for k in cfg.layer_types],
        "hybrid_override_pattern": cfg.layer_pattern,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "attention_bias": False,
        "intermediate_size": cfg.mlp_intermediate_size,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "mamba_num_heads": cfg.mamba_num_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "n_groups": cfg.mamba_groups,
        "ssm_state_size": cfg.ssm_state_size,
        "conv_kernel": cfg.conv_kernel,
        "chunk_size": cfg.chunk_size,
        "expand": max(1, cfg.mamba_d_inner // cfg.hidden_size),  # unused by NemotronH (heads x head_dim rule)
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "use_bias": False,
        "mamba_hidden_act": "silu",
        "time_step_min": cfg.time_step_min,
        "time_step_max": cfg.time_step_max,
        "time_step_floor": cfg.time_step_floor,
        "time_step_limit": [0.0, math.inf],
        "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "moe_latent_size": cfg.moe_latent_size,
        "moe_shared_expert_intermediate_size": cfg.shared_expert_intermediate_size,
        "n_shared_experts": 1,
        "routed_scaling_factor": cfg.routed_scaling_factor,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 1 if cfg.mtp_depths else 0,
        "mtp_layers_block_type": ["full_attention", "moe"],
        "layer_norm_epsilon": cfg.norm_eps,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "residual_in_fp32": False,
        "rescale_prenorm_residual": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        # what NemotronHConfig has no field for, so a round trip is lossless
        "latentforge": cfg.to_dict(),
    }


def from_hf_config(hf: dict) -> ModelConfig:
    if "latentforge" in hf:
        return ModelConfig.from_dict(hf["latentforge"])
    if "layers_block_type" in hf:
        inverse = {"mamba": "M", "attention": "*", "moe": "E", "mlp": "-"}
        pattern = "".join(inverse[HF_TO_KIND[t]] for t in hf["layers_block_type"])
    else:
        pattern = hf["hybrid_override_pattern"]
    if hf.get("n_group", 1) != 1 or hf.get("topk_group", 1) != 1 or not hf.get("norm_topk_prob", True):
        raise ValueError("grouped routing (n_group/topk_group > 1) or unnormalised top-k is not supported")
    return ModelConfig(
        pattern=pattern,
        hidden_size=hf["hidden_size"],
        vocab_size=hf["vocab_size"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_key_value_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        mamba_num_heads=hf["mamba_num_heads"],
        mamba_head_dim=hf["mamba_head_dim"],
        mamba_groups=hf.get("n_groups", hf.get("mamba_n_groups", 8)),
        ssm_state_size=hf["ssm_state_size"],
        conv_kernel=hf.get("conv_kernel", 4),
        chunk_size=hf.get("chunk_size", 128),
        num_experts=hf.get("n_routed_experts", 8),
        top_k=hf.get("num_experts_per_tok", 2),
        moe_intermediate_size=hf.get("moe_intermediate_size", 7688),
        moe_latent_size=hf.get("moe_latent_size"),
        shared_expert_intermediate_size=hf.get("moe_shared_expert_intermediate_size", 7688),
        routed_scaling_factor=hf.get("routed_scaling_factor", 1.0),
        mlp_intermediate_size=hf.get("intermediate_size", 21504),
        # Super applies its one MTP block at depths 1 and 2 (SPEC section 2)
        mtp_depths=2 if hf.get("num_nextn_predict_layers", 0) else 0,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )


# ----- tensors -----------------------------------------------------------------------------------------------
def to_hf_tensors(state_dict: dict) -> dict:
    """Our names -> checkpoint names (routed experts split per expert)."""
    out = {}
    for name, tensor in state_dict.items():
        match = STACKED_EXPERTS.match(name)
        if match:
            prefix, proj = match.groups()
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.{proj}.weight"] = tensor[e]
        else:
            out[name] = tensor
    return out


def from_hf_tensors(tensors: dict) -> dict:
    """Checkpoint names (ours, or transformers' `model.` + stacked experts) -> our names."""
    out, experts = {}, {}
    for name, tensor in tensors.items():
        if name.startswith("model."):
            name = "backbone." + name[len("model.") :]
        match = PER_EXPERT.match(name)
        if match:
            prefix, e, proj = match.groups()
            experts.setdefault(f"{prefix}.{proj}", {})[int(e)] = tensor
        else:
            out[name] = tensor
    for name, per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise ValueError(f"{name}: experts {sorted(per_expert)} are not numbered 0..{len(per_expert) - 1}")
        out[name] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    return out


# ----- save / load -------------------------------------------------------------------------------------------
def save_pretrained(model: HybridModel, path, *, dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30):
    """Write config.json and safetensors shards (with an index when there is more than one shard)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # Transformer Engine modules add `*._extra_state` (FP8 metadata): not weights, not part of the checkpoint
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tensors = {k: v.contiguous().cpu() for k, v in to_hf_tensors(state).items()}
    saved_dtype = dtype or model.lm_head.weight.dtype
    (path / "config.json").write_text(json.dumps(to_hf_config(model.cfg, saved_dtype), indent=2) + "\n")

    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path / file), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return path


def read_tensors(path) -> dict:
    path = Path(path)
    if (path / INDEX_FILE).exists():
        files = sorted(set(json.loads((path / INDEX_FILE).read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors files in {path}")
    tensors = {}
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def load_pretrained(path, *, dtype: torch.dtype = torch.float32, device="cpu", strict_mtp: bool = True) -> HybridModel:
    """Build the model from config.json and load its tensors; missing or unexpected names are an error.

    A checkpoint without `mtp.*` (transformers drops them) loads with `strict_mtp=False`: the MTP block keeps
    its fresh initialisation.
    """
    path = Path(path)
    cfg = from_hf_config(json.loads((path / "config.json").read_text()))
    state = from_hf_tensors(read_tensors(path))
    with torch.device("meta"):
        model = HybridModel(cfg)
    model.to_empty(device=device)
    model.init_weights()
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if not strict_mtp:
        missing = [m for m in missing if not m.startswith("mtp.")]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
            f", unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )
    model.load_state_dict(state, strict=False)
    return model.to(dtype)


# ----- DCP checkpoints (written by train/) -> Hugging Face -----------------------------------------------------
# A trainer checkpoint is a torch.distributed.checkpoint directory `step_XXXXXXXX/` (complete once its
# `manifest.json` of checksums exists, see model/manifest.py; the trainer renames it into place) whose `model` entry is keyed by this model's parameter names, with
# `model_config.json` (and `tokenizer.json` for file-based tokenizers) written next to the shards. DCP reassembles
# full tensors from any parallel layout's shards, so one CPU process reads what thousands of GPUs wrote.
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"
LORA_CONFIG_FILE = "lora_config.json"
STEP_DIR = re.compile(r"^step_(\d+)$")


def complete_checkpoints(folder) -> list:
    """[(step, path)] of the complete checkpoints in `folder`, oldest first (train.checkpoint uses this too)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    # manifest.json is written last (train/checkpoint.py); `.metadata` alone: written by plain dcp.save or an older
    # LatentForge, complete but without checksums
    return sorted(
        (int(m.group(1)), str(child))
        for child in folder.iterdir()
        if (m := STEP_DIR.match(child.name)) and ((child / MANIFEST_FILE).is_file() or (child / ".metadata").is_file())
    )


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or a run directory / checkpoints folder -> its newest complete checkpoint."""
    path = Path(path).resolve()
    if (path / ".metadata").is_file() or (path / MANIFEST_FILE).is_file():
        return path
    for folder in (path / "checkpoints", path):
        steps = complete_checkpoints(folder)
        if steps:
            return Path(steps[-1][1])
    raise FileNotFoundError(
        f"no complete DCP checkpoint at {path} (expected a step_XXXXXXXX directory with a "
        ".metadata file, or a run directory holding checkpoints/)"
    )


def load_dcp_checkpoint(path) -> HybridModel:
    """The plain model (CPU, fp32) with the weights of a trainer checkpoint (a run directory picks its newest)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    path = resolve_checkpoint(path)
    if (path / LORA_CONFIG_FILE).is_file():
        raise ValueError(
            f"{path} is a LoRA checkpoint (it holds {LORA_CONFIG_FILE}): its base alone would drop the "
            f"adapters. Export it with the adapters merged: python -m latentforge.train.export {path} OUT (in "
            "Python: train.export.load_model_from_checkpoint)"
        )
    config_file = path / MODEL_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} is missing: this checkpoint was not written by LatentForge's "
            "trainers (train/pretrain.py, train/sft.py, rl/grpo.py)"
        )
    verify_checkpoint(path)  # before anything in it is unpickled or loaded
    read_dcp_metadata(path)  # a damaged .metadata is named in one line, not an UnpicklingError
    cfg = ModelConfig.from_dict(json.loads(config_file.read_text()))
    with torch.device("meta"):
        model = HybridModel(cfg)
    model = model.to_empty(device="cpu")  # every tensor is overwritten by the load below
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that a single-process load has no process group (asked for)
        warnings.filterwarnings("ignore", message="torch.distributed is .*")
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    model.load_state_dict(state["model"])
    return model


def export_dcp_checkpoint(
    checkpoint, out_dir, dtype: torch.dtype = torch.float32, tokenizer: str | None = None
) -> Path:
    """DCP checkpoint (or run directory) -> a Hugging Face directory that stands alone: config.json, safetensors,
    and the tokenizer files of data/hf_tokenizer.py (tokenizer.json, tokenizer_config.json with the chat template,
    generation_config.json). `tokenizer`: a tokenizer spec when the checkpoint does not record one."""
    from latentforge.data.hf_tokenizer import export_checkpoint_tokenizer  # data sits beside model: no cycle at import

    checkpoint = resolve_checkpoint(checkpoint)
    model = load_dcp_checkpoint(
        checkpoint
    )  # refuses a LoRA checkpoint (python -m latentforge.train.lora merge exports it)
    save_pretrained(model, out_dir, dtype=dtype)
    export_checkpoint_tokenizer(checkpoint, out_dir, tokenizer)
    return Path(out_dir)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> int:
    """python -m latentforge.model.hf export CHECKPOINT_OR_RUN_DIR OUT_DIR [--dtype bfloat16]"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m latentforge.model.hf", description="Hugging Face interop")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="DCP checkpoint (any parallel layout) -> Hugging Face directory")
    export.add_argument("checkpoint", help="a step_XXXXXXXX checkpoint directory, or a run directory (its newest)")
    export.add_argument("out_dir", help="where config.json and the safetensors go")
    export.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    export.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer spec (tekken, bpe:4096, path/tokenizer.json) when the checkpoint records none",
    )
    args = parser.parse_args(argv)
    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        export_dcp_checkpoint(checkpoint, args.out_dir, dtype=DTYPES[args.dtype], tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError, UserError) as error:
        parser.exit(2, f"python -m latentforge.model.hf export: {error}\n")
    print(f"exported {checkpoint} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
