"""The plan of a layout without allocating anything: stages, their layers, and parameters per GPU (for --dry-run).

    plan = layout_plan(model_cfg, ParallelConfig(pp=2, ep=32, dp_shard=32), world_size=64)
    print(format_plan(plan))

Parameters per GPU count each tensor once per rank as it is stored: tensor-parallel weights / tp, routed experts
/ ep, then everything / the FSDP shard count (dp_shard x cp for dense weights, dp_shard x cp / ep for experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from latentforge.model.config import ModelConfig

from .config import Layout, ParallelConfig, validate_layout

# parameter names (last two components) split over the TP group, per mixer
_TP_SPLIT = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "o_proj.weight",
    "in_proj.weight",
    "conv1d.weight",
    "conv1d.bias",
    "mixer.dt_bias",
    "mixer.A_log",
    "mixer.D",
    "out_proj.weight",
    "shared_experts.up_proj.weight",
    "shared_experts.down_proj.weight",
)


@dataclass
class StagePlan:
    stage: int
    pp_rank: int
    layers: list[int]  # layer indices of the full model
    pattern: str  # their symbols
    parameters: int  # the stage's parameters (unsharded, with buffers)
    expert_parameters: int
    parameters_per_gpu: float  # as stored on one GPU of this stage


def _tp_split(name: str, kind: str) -> bool:
    if kind == "mlp" and name.endswith(("up_proj.weight", "down_proj.weight")):
        return True
    if name.endswith("mixer.norm.weight") and kind == "mamba":
        return True
    return name.endswith(_TP_SPLIT)


def layout_plan(
    model_cfg: ModelConfig, pc: ParallelConfig, world_size: int, seq_len: Optional[int] = None
) -> tuple[Layout, list[StagePlan]]:
    """(Layout, [StagePlan]) for `pc` on `world_size` ranks; validates like build_runner does."""
    import torch

    from latentforge.model import HybridModel

    layout = validate_layout(model_cfg, pc, world_size, seq_len=seq_len)
    with torch.device("meta"):
        model = HybridModel(model_cfg)
    symbols = {"mamba": "M", "attention": "*", "moe": "E", "mlp": "-"}
    dense_shards = layout.dp_shard * layout.cp
    expert_shards = max(dense_shards // layout.ep, 1)
    plans = []
    last = layout.num_stages - 1
    for stage, layers in enumerate(layout.stage_layers):
        named = []
        for i in layers:
            block = model.backbone.layers[i]
            named += [(n, t, block.kind) for n, t in block.state_dict(keep_vars=True).items()]
        if stage == 0:
            named.append(("embeddings.weight", model.backbone.embeddings.weight, None))
        if stage == last:
            named.append(("norm_f.weight", model.backbone.norm_f.weight, None))
            named.append(("lm_head.weight", model.lm_head.weight, None))
            if model.mtp is not None:
                if stage > 0:  # the last stage's own embedding copy for the MTP block (stage.py)
                    named.append(("embeddings.weight", model.backbone.embeddings.weight, None))
                kinds = ("attention", "moe")
                for j, layer in enumerate(model.mtp.layers):
                    named += [(n, t, kinds[j]) for n, t in layer.state_dict(keep_vars=True).items()]
        total = experts = 0
        per_gpu = 0.0
        for name, tensor, kind in named:
            n = tensor.numel()
            total += n
            if name.endswith(("experts.up_proj", "experts.down_proj")):
                experts += n
                per_gpu += n / layout.ep / expert_shards
            elif name.endswith("e_score_correction_bias"):
                per_gpu += n  # a buffer: whole on every rank
            else:
                split = layout.tp if (layout.tp > 1 and _tp_split(name, kind)) else 1
                per_gpu += n / split / dense_shards
        plans.append(
            StagePlan(
                stage=stage,
                pp_rank=stage % layout.pp,
                layers=list(layers),
                pattern="".join(symbols[model_cfg.layer_types[i]] for i in layers),
                parameters=total,
                expert_parameters=experts,
                parameters_per_gpu=per_gpu,
            )
        )
    return layout, plans


def format_plan(layout: Layout, plans: Sequence[StagePlan], bytes_per_parameter: float = 16.0) -> str:
    """Text for --dry-run. `bytes_per_parameter`: 16 = fp32 weights + fp32 grads + AdamW's two fp32 moments."""
    lines = [f"mesh: {layout.describe()}"]
    by_rank: dict[int, float] = {}  # pp rank -> parameters per GPU
    for p in plans:
        by_rank[p.pp_rank] = by_rank.get(p.pp_rank, 0.0) + p.parameters_per_gpu
        lines.append(
            f"  stage {p.stage} (pp rank {p.pp_rank}): layers {p.layers[0]}..{p.layers[-1]} "
            f"'{p.pattern}' -> {p.parameters:,} parameters ({p.expert_parameters:,} in routed experts), "
            f"{p.parameters_per_gpu:,.0f} per GPU"
        )
    for rank, count in sorted(by_rank.items()):
        gib = count * bytes_per_parameter / 2**30
        lines.append(
            f"  pp rank {rank}: {count:,.0f} parameters per GPU, {gib:.1f} GiB for weights, grads and "
            f"AdamW states at {bytes_per_parameter:g} bytes/parameter (activations not included)"
        )
    return "\n".join(lines)
