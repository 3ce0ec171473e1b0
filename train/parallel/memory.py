"""Activation memory of one micro-batch per GPU, by layer kind, for the plan (`--dry-run`).

What a layer keeps for its backward is counted tensor by tensor from the code (the reference kernels' saved
tensors; tests/train/test_parallel_memory.py measures them with saved_tensors_hooks and holds this model to 20%),
per token of the piece the tensor lives on:
  T_local = b * s / (cp * tp)   the residual stream between blocks (sequence parallel);
  T_cp    = b * s / cp          inside a tensor-parallel mixer (its CP tokens gathered over TP), heads / tp.
A kind under activation checkpointing keeps only its block input (H per local token); its full set is then
alive once more during that layer's recompute (the transient below).

The peak per GPU adds to the stored weights, gradients and optimizer state: the saved activations of the
micro-batches in flight (1; 1F1B: up to pp on the first stage; GPipe: all of them), plus the largest transient of
one layer: the all-gathered K/V of context-parallel attention with their fp32 gradients and one block of scores
(cp_attention.py), or a checkpointed layer's recompute. Allocator fragmentation and communication buffers are not
modelled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    from latentforge.model.config import ModelConfig

    from .config import Layout, ParallelConfig

# (values in the compute dtype, values in fp32, bytes) one layer keeps for its backward
Values = tuple[float, float, float]

KINDS = ("mamba", "attention", "moe", "mlp")


@dataclass
class Sizes:
    """Token counts of one micro-batch on one GPU, and the bytes of a saved activation value."""

    local: float  # tokens of the residual stream on this rank
    cp: float  # tokens a tensor-parallel mixer sees (this CP rank's share of the sequence)
    seq_len: int
    tp: int
    cp_size: int
    value_bytes: int  # compute dtype (4 fp32, 2 bf16)


def _norm(cfg: ModelConfig, sz: Sizes) -> float:
    """The pre-norm of a block (its input and rstd, the normed output), and the mixer's input projection input
    (gathered over TP): values per micro-batch."""
    return sz.local * (2 * cfg.hidden_size + 1) + sz.cp * cfg.hidden_size


def mamba_values(cfg: ModelConfig, sz: Sizes) -> Values:
    """(values in the compute dtype, values in fp32, bytes of masks) one Mamba layer keeps."""
    tp = sz.tp
    h, p, n, Q = cfg.mamba_num_heads / tp, cfg.mamba_head_dim, cfg.ssm_state_size, cfg.chunk_size
    gn = cfg.mamba_groups * n / tp
    di = cfg.mamba_d_inner / tp
    conv = di + 2 * gn
    in_proj = di + conv + h
    # in_proj output, conv input (padded) and output, the silu output (x | B | C), gated norm and out_proj input
    io = in_proj + 3 * conv + 5 * di + cfg.mamba_groups / tp
    # the chunked scan: dt (raw, softplus), decays within chunks (h x Q per token, five tensors), B and C in
    # chunk layout, chunk states (h p n per chunk), the states read back (h p)
    scan = 4 * h + 5 * h * Q + 4 * gn + h * p * n / Q + 2 * h * p
    if sz.cp_size > 1:
        scan += h * p + 2 * h  # the incoming state's closed-form term (context_parallel.py)
    return _norm(cfg, sz) + sz.cp * io, sz.cp * scan, sz.cp * (Q + 4)


def attention_values(cfg: ModelConfig, sz: Sizes, blockwise: bool) -> Values:
    hq, hkv, d = cfg.num_attention_heads / sz.tp, cfg.num_key_value_heads / sz.tp, cfg.head_dim
    values = _norm(cfg, sz) + sz.cp * (2 * hq * d + 2 * hkv * d)  # q, out; this rank's k, v
    fp32 = sz.cp * hq  # log-sum-exp
    if blockwise:
        values += sz.cp * hq * d  # o_proj input (the output made contiguous)
    else:
        fp32 += sz.cp * sz.seq_len  # one process: SDPA keeps the (s x s) document mask as float
    return values, fp32, 0.0


def mlp_values(cfg: ModelConfig, sz: Sizes) -> Values:
    return _norm(cfg, sz) + sz.cp * 2 * cfg.mlp_intermediate_size / sz.tp, 0.0, 0.0


def moe_values(cfg: ModelConfig, sz: Sizes) -> Values:
    """Routed experts on this rank's own tokens (no TP split): router scores, weights, the latent projection in
    and out, per routed copy the expert input, up output and activation; the shared expert tensor-parallel."""
    k, D, I, H = cfg.top_k, cfg.expert_dim, cfg.moe_intermediate_size, cfg.hidden_size
    latent_out = cfg.moe_latent_size or 0  # fc2_latent_proj's input; no latent projections without a latent
    routed = sz.local * (cfg.num_experts + 2 + 2 * k + k * D + k * (D + 2 * I + 1) + latent_out + 2 * H + 1)
    shared = sz.cp * 2 * cfg.shared_expert_intermediate_size / sz.tp
    index_bytes = sz.local * 3 * k * 8  # int64 routing indices
    return _norm(cfg, sz) + routed + shared, 0.0, index_bytes


def _bytes(values: Values, sz: Sizes) -> float:
    compute, fp32, raw = values
    return compute * sz.value_bytes + fp32 * 4 + raw


@dataclass
class ActivationPlan:
    per_layer: dict[str, float]  # kind -> bytes one layer of that kind keeps (not checkpointed)
    layers: dict[str, int]  # kind -> number of layers on the heaviest pipeline rank
    checkpointed: set[str]
    heads: float  # final norm, LM and MTP cross-entropies, MTP block (last stage)
    saved: float  # bytes kept for the backward by one micro-batch on the heaviest rank
    transient: float  # the largest one-layer transient on top
    in_flight: int  # micro-batches whose activations are alive at once
    by_kind: dict[str, float] = field(default_factory=dict)  # kind -> bytes kept by all its layers on that rank

    @property
    def peak(self) -> float:
        return self.saved * self.in_flight + self.transient


def plan_activations(
    model_cfg: ModelConfig,
    pc: Optional[ParallelConfig],
    layout: Layout,
    seq_len: int,
    micro_batch_size: int,
    num_microbatches: int = 1,
    value_bytes: int = 4,
    mtp_on_rank: bool = True,
    layers_on_rank: Optional[Iterable[int]] = None,
) -> ActivationPlan:
    """Activation bytes of one micro-batch on one GPU holding `layers_on_rank` (layer indices, default all) and,
    with `mtp_on_rank`, the heads and MTP block. `value_bytes`: the compute dtype's size. Attention is blockwise
    under CP or TP (the runner's parallel forwards); otherwise the model's own SDPA keeps a dense mask."""
    cfg = model_cfg
    b = micro_batch_size
    sz = Sizes(
        local=b * seq_len / (layout.cp * layout.tp),
        cp=b * seq_len / layout.cp,
        seq_len=seq_len,
        tp=layout.tp,
        cp_size=layout.cp,
        value_bytes=value_bytes,
    )
    per_layer = {
        "mamba": _bytes(mamba_values(cfg, sz), sz),
        "attention": _bytes(attention_values(cfg, sz, blockwise=layout.cp > 1 or layout.tp > 1), sz),
        "moe": _bytes(moe_values(cfg, sz), sz),
        "mlp": _bytes(mlp_values(cfg, sz), sz),
    }
    checkpointed = set(pc.checkpointed_kinds()) if pc is not None else set()
    indices = range(cfg.num_layers) if layers_on_rank is None else layers_on_rank
    layers = {kind: 0 for kind in KINDS}
    for i in indices:
        layers[cfg.layer_types[i]] += 1
    kept_input = sz.local * cfg.hidden_size * value_bytes
    by_kind = {kind: layers[kind] * (kept_input if kind in checkpointed else per_layer[kind]) for kind in KINDS}
    heads = 0.0
    if mtp_on_rank:
        heads = _heads_bytes(cfg, sz, per_layer, checkpointed, kept_input)
    saved = sum(by_kind.values()) + heads
    transient = max(
        [_attention_transient(cfg, sz, pc)]
        + [per_layer[kind] for kind in KINDS if layers[kind] and kind in checkpointed]
    )
    return ActivationPlan(
        per_layer=per_layer,
        layers=layers,
        checkpointed=checkpointed,
        heads=heads,
        saved=saved,
        transient=transient,
        in_flight=_in_flight(pc, layout, num_microbatches),
        by_kind=by_kind,
    )


def _heads_bytes(
    cfg: ModelConfig, sz: Sizes, per_layer: dict[str, float], checkpointed: set[str], kept_input: float
) -> float:
    """Final norm and the cross-entropies (hidden, lse, labels per head); per MTP depth its attention and MoE
    layers plus its norms and eh_proj input (7 H per token)."""
    H = cfg.hidden_size
    heads = 1 + cfg.mtp_depths
    total = sz.local * ((2 * H + 1) + heads * (H + 1)) * sz.value_bytes + sz.local * heads * 9
    if cfg.mtp_depths:
        if "mtp" in checkpointed:
            depth = 2 * kept_input
        else:
            depth = per_layer["attention"] + per_layer["moe"] + sz.local * (7 * H + 2) * sz.value_bytes
        total += cfg.mtp_depths * depth
    return total


def _attention_transient(cfg: ModelConfig, sz: Sizes, pc: Optional[ParallelConfig]) -> float:
    """Context-parallel attention: every rank's K/V gathered (compute dtype) and their fp32 gradients in the
    backward, plus one block of scores and probabilities (fp32) per query head."""
    if sz.cp_size == 1 and sz.tp == 1:
        return 0.0
    hkv, hq = cfg.num_key_value_heads / sz.tp, cfg.num_attention_heads / sz.tp
    batch = sz.cp / sz.seq_len * sz.cp_size  # micro-batch rows
    full_kv = batch * sz.seq_len * 2 * hkv * cfg.head_dim
    block = getattr(pc, "attention_block", 1024) if pc is not None else 1024
    return full_kv * (sz.value_bytes + 4) + batch * hq * block * block * 4 * 3


def _in_flight(pc: Optional[ParallelConfig], layout: Layout, num_microbatches: int) -> int:
    if layout.pp == 1 or pc is None:
        return 1
    if pc.pp_schedule == "gpipe":
        return num_microbatches
    return min(num_microbatches, layout.pp * max(layout.virtual_stages, 1))
