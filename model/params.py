"""Parameter and FLOP counting, from the model built on the meta device (nothing is allocated).

    python -m latentforge.model.params recipe=super_120b [seq_len=4096] [model.mtp_depths=1 ...]

Counts include the expert-bias buffers (`e_score_correction_bias`), which the checkpoint stores as tensors.
FLOPs follow Megatron's hybrid formula (forward x 3; MTP depths add one attention and one MoE layer each and one
more lm_head), so numbers compare with Megatron's and NeMo's reported TFLOP/s.
"""

import sys
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from .config import ModelConfig
from .errors import entry_point
from .hybrid import HybridModel


@dataclass
class ParamCounts:
    total: int  # with MTP
    without_mtp: int
    mtp: int
    active: int  # per token, embedding and lm_head included, MTP excluded
    per_layer: dict[str, tuple[int, ...]]  # kind -> (count, params per layer incl. its norm, active params per layer)
    embedding: int
    lm_head: int


def _numel(named: Iterable[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() for _, t in named)


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers: what a checkpoint holds."""
    yield from module.named_parameters()
    yield from ((n, b) for n, b in module.named_buffers() if n.endswith("e_score_correction_bias"))


def meta_model(cfg: ModelConfig) -> HybridModel:
    with torch.device("meta"):
        return HybridModel(cfg)


def count_parameters(model: HybridModel) -> ParamCounts:
    cfg = model.cfg
    total = _numel(_tensors(model))
    mtp = _numel(_tensors(model.mtp)) if model.mtp is not None else 0
    inactive_experts = cfg.num_experts - cfg.top_k
    expert_params = 2 * cfg.moe_intermediate_size * cfg.expert_dim
    per_layer = {}
    for block in model.backbone.layers:
        if block.kind not in per_layer:
            n = _numel(_tensors(block))
            active = n - inactive_experts * expert_params if block.kind == "moe" else n
            per_layer[block.kind] = [0, n, active]
        per_layer[block.kind][0] += 1
    active = (total - mtp) - cfg.count("moe") * inactive_experts * expert_params
    return ParamCounts(
        total=total,
        without_mtp=total - mtp,
        mtp=mtp,
        active=active,
        per_layer={k: tuple(v) for k, v in per_layer.items()},
        embedding=model.backbone.embeddings.weight.numel(),
        lm_head=model.lm_head.weight.numel(),
    )


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Megatron's hybrid FLOP formula (forward + backward = 3 x forward), per token, at sequence length seq_len."""
    h = cfg.hidden_size
    attention = (
        4
        * h
        * (cfg.num_attention_heads * cfg.head_dim / h)
        * (h + h * cfg.num_key_value_heads / cfg.num_attention_heads + seq_len / 2)
    )
    d_in = cfg.mamba_d_inner
    groups_state = cfg.mamba_groups * cfg.ssm_state_size
    mamba = 2 * h * (2 * d_in + 2 * groups_state + cfg.mamba_num_heads) + 7 * d_in * cfg.ssm_state_size + 2 * d_in * h
    if cfg.moe_latent_size is None:
        routed = 4 * h * cfg.moe_intermediate_size * cfg.top_k
    else:
        routed = 4 * cfg.moe_latent_size * cfg.moe_intermediate_size * cfg.top_k + 4 * h * cfg.moe_latent_size
    moe = routed + 4 * h * cfg.shared_expert_intermediate_size
    mlp = 4 * h * cfg.mlp_intermediate_size
    depths = cfg.mtp_depths
    forward = (
        (cfg.count("attention") + depths) * attention
        + cfg.count("mamba") * mamba
        + (cfg.count("moe") + depths) * moe
        + cfg.count("mlp") * mlp
        + 2 * h * cfg.vocab_size * (1 + depths)
    )
    return 3 * forward


def format_report(cfg: ModelConfig, counts: ParamCounts, seq_len: int) -> str:
    names = {"mamba": "Mamba-2", "attention": "attention", "moe": "MoE", "mlp": "MLP"}
    lines = [
        f"pattern            {cfg.layer_pattern} ({cfg.num_layers} layers)",
        f"total parameters   {counts.total:,} (with MTP)",
        f"without MTP        {counts.without_mtp:,}",
        f"MTP block          {counts.mtp:,} (applied at {cfg.mtp_depths} depth(s))",
        f"active per token   {counts.active:,} (embedding + lm_head included)",
        f"embedding          {counts.embedding:,}",
        f"lm_head            {counts.lm_head:,}",
        "per layer kind     count  params/layer  active/layer  total",
    ]
    for kind, (count, each, active) in counts.per_layer.items():
        lines.append(f"  {names[kind]:<16} {count:>5}  {each:>12,}  {active:>12,}  {count * each:,}")
    flops = training_flops_per_token(cfg, seq_len)
    lines.append(
        f"training FLOPs     {flops / 1e9:.2f} GFLOP per token at sequence {seq_len} (Megatron hybrid formula)"
    )
    return "\n".join(lines)


@entry_point("latentforge-params")
def main(argv: Optional[list[str]] = None) -> None:
    from .recipes import compose, model_config_from

    argv = list(sys.argv[1:] if argv is None else argv)
    seq_len = 4096
    for arg in list(argv):
        if arg.startswith("seq_len="):
            seq_len = int(arg.split("=", 1)[1])
            argv.remove(arg)
    cfg = model_config_from(compose(argv))
    print(format_report(cfg, count_parameters(meta_model(cfg)), seq_len))


if __name__ == "__main__":
    main()
