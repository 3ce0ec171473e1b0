"""The run's plan, computed without allocating anything (`train/pretrain.py --dry-run` prints it; a normal start
prints it too): the model, the mesh, the batch, FLOPs per token, and per-GPU memory of the parameters, gradients and
optimizer state. Per-GPU parameter counts come from `train.parallel.layout_plan`, which counts every tensor as the
runner stores it (tensor-parallel splits, expert-parallel shards, FSDP shards, pipeline stages).

Memory model (FSDP2 with fp32 master weights, as the runner trains): 4 bytes (fp32 weight) + 4 (fp32 gradient) +
8 (AdamW's two moments) = 16 bytes per stored parameter. Activations per micro-batch come from
`train.parallel.memory` (by layer kind, with the chosen activation checkpointing, CP and TP; bf16 values by default)
and the peak per GPU adds the micro-batches in flight and the largest one-layer transient. FSDP's transient
unsharded copy of one layer and allocator fragmentation are not included.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from latentforge.train.parallel import ParallelConfig

BYTES_PARAM, BYTES_GRAD, BYTES_ADAM = 4, 4, 8
GIB = 2**30
GPU_BYTES = 80e9  # an 80 GB H100 / A100


def format_plan(
    model_cfg,
    parallel_cfg: ParallelConfig,
    layout,
    *,
    seq_len: int,
    micro_batch_size: int,
    global_batch_size: int,
    activation_bytes: int = 2,
) -> str:
    from latentforge.model.params import count_parameters, meta_model, training_flops_per_token
    from latentforge.train.parallel import layout_plan

    counts = count_parameters(meta_model(model_cfg))
    accumulation = global_batch_size // (micro_batch_size * layout.dp) if layout.dp else 0
    lines = [
        f"model      {model_cfg.layer_pattern} ({model_cfg.num_layers} layers), {counts.total:,} parameters "
        f"({counts.active:,} active per token), MTP depths {model_cfg.mtp_depths}",
        f"mesh       {layout.describe()}  (data-parallel size {layout.dp})",
        f"batch      {global_batch_size} sequences x {seq_len} tokens = {global_batch_size * seq_len:,} tokens per "
        f"step; micro-batch {micro_batch_size}, {accumulation} micro-batch(es) per step per data-parallel rank",
        f"flops      {training_flops_per_token(model_cfg, seq_len) / 1e9:.2f} GFLOP per token (training, "
        "Megatron hybrid formula)",
    ]
    lines.append(
        f"pipeline   schedule {parallel_cfg.pp_schedule}, activation checkpointing "
        f"{sorted(parallel_cfg.checkpointed_kinds()) or 'none'}, compile {parallel_cfg.compile}"
    )
    _, stages = layout_plan(model_cfg, parallel_cfg, layout.world_size, seq_len=seq_len)
    lines.append("memory per GPU (fp32 weights + fp32 grads + AdamW moments = 16 B/param; activations below)")
    per_rank: dict = {}
    for stage in stages:
        entry = per_rank.setdefault(stage.pp_rank, {"layers": [], "pattern": [], "params": 0.0, "experts": 0})
        entry["layers"] += stage.layers
        entry["pattern"].append(stage.pattern)
        entry["params"] += stage.parameters_per_gpu
        entry["experts"] += stage.expert_parameters
    for rank, entry in sorted(per_rank.items()):
        params = entry["params"]
        lines.append(
            f"  pp rank {rank}: layers {min(entry['layers'])}-{max(entry['layers'])} {'|'.join(entry['pattern'])}  "
            f"{params:,.0f} params per GPU ({entry['experts']:,} routed-expert params in the stage): weights "
            f"{params * BYTES_PARAM / GIB:.2f} GiB, grads {params * BYTES_GRAD / GIB:.2f} GiB, optimizer "
            f"{params * BYTES_ADAM / GIB:.2f} GiB, total {params * (BYTES_PARAM + BYTES_GRAD + BYTES_ADAM) / GIB:.2f} GiB"
        )
    last_rank = stages[-1].pp_rank if stages else 0
    lines += activation_lines(
        model_cfg,
        parallel_cfg,
        layout,
        per_rank,
        last_rank,
        seq_len=seq_len,
        micro_batch_size=micro_batch_size,
        num_microbatches=max(accumulation, 1),
        value_bytes=activation_bytes,
    )
    return "\n".join(lines)


def activation_lines(
    model_cfg,
    parallel_cfg,
    layout,
    per_rank: dict,
    last_rank: int,
    *,
    seq_len: int,
    micro_batch_size: int,
    num_microbatches: int,
    value_bytes: int,
) -> list:
    """Activation memory per micro-batch by layer kind and the peak per GPU, for every pipeline rank."""
    from latentforge.train.parallel.memory import plan_activations

    checkpointed = sorted(parallel_cfg.checkpointed_kinds()) if parallel_cfg is not None else []
    lines = [
        f"activations per micro-batch ({micro_batch_size} x {seq_len} tokens, {value_bytes}-byte values, "
        f"cp {layout.cp}, tp {layout.tp}, checkpointed {checkpointed or 'none'})"
    ]
    for rank, entry in sorted(per_rank.items()):
        plan = plan_activations(
            model_cfg,
            parallel_cfg,
            layout,
            seq_len,
            micro_batch_size,
            num_microbatches,
            value_bytes=value_bytes,
            layers_on_rank=entry["layers"],
            mtp_on_rank=rank == last_rank,
        )
        kinds = ", ".join(
            f"{kind} {plan.layers[kind]} x {plan.by_kind[kind] / max(plan.layers[kind], 1) / GIB:.2f}"
            for kind in plan.by_kind
            if plan.layers[kind]
        )
        states = entry["params"] * (BYTES_PARAM + BYTES_GRAD + BYTES_ADAM)
        peak = states + plan.peak
        margin = (GPU_BYTES - peak) / GIB
        verdict = (
            f"fits an 80 GB GPU ({margin:.1f} GiB spare)"
            if margin >= 0
            else f"does NOT fit an 80 GB GPU: {-margin:.1f} GiB over"
        )
        lines.append(
            f"  pp rank {rank}: {kinds} GiB; heads and MTP {plan.heads / GIB:.2f} GiB; "
            f"{plan.saved / GIB:.2f} GiB kept per micro-batch x {plan.in_flight} in flight, "
            f"+ {plan.transient / GIB:.2f} GiB one-layer transient"
        )
        lines.append(
            f"  pp rank {rank} peak per GPU: {states / GIB:.2f} (weights, grads, optimizer) + "
            f"{plan.peak / GIB:.2f} (activations) = {peak / GIB:.2f} GiB; {verdict}"
        )
    return lines
