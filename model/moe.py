"""LatentMoE (SPEC section 3): sigmoid router on the full hidden state, expert-bias top-k, routed experts in a
latent space (down-projected from hidden), and one shared expert at full width.

The forward returns its output and its `Routing` (router scores and chosen experts): the loss module
(`latentforge.train.loss`) turns the routing into the sequence-level balance loss and the expert loads, which the
trainer sums over data-parallel ranks and feeds back through `update_bias` (aux-loss-free balancing). The layer
keeps no per-forward state.
"""

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.kernels.moe import LinearFn, moe_experts

from .config import ModelConfig
from .mixer_types import LayerState, MixerContext
from .mlp import MLP


class Routing(NamedTuple):
    """What one MoE layer's forward decided, for the losses and rollout routing replay."""

    scores: torch.Tensor  # (tokens, E) fp32 sigmoid scores (their gradient trains the router)
    topk_idx: torch.Tensor  # (tokens, top_k) the experts used (the replayed ones under routing replay)
    router_topk: torch.Tensor  # (tokens, top_k) the router's own choice (== topk_idx unless replayed)


class Router(nn.Module):
    """fp32 sigmoid scores; the expert bias only chooses the experts, the weights use the unbiased scores."""

    e_score_correction_bias: torch.Tensor  # a registered buffer, which torch's stubs type as Tensor | Module

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, routed_scaling_factor: float) -> None:
        super().__init__()
        self.top_k = top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # a buffer: trained by the balancing rule, never by gradient, and saved with the checkpoint
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, routes: Optional[torch.Tensor] = None) -> tuple[Routing, torch.Tensor]:
        """-> (Routing, topk_weight). `routes` (tokens, top_k): use these experts instead of choosing (rollout
        routing replay); the weights still come from this router's own scores, so its gradient flows."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32 under mixed precision
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        with torch.no_grad():
            _, router_topk = torch.topk(scores + self.e_score_correction_bias.float(), self.top_k, dim=-1)
        topk_idx = router_topk
        if routes is not None:
            if tuple(routes.shape) != (scores.shape[0], self.top_k):
                raise ValueError(
                    f"replayed routes have shape {tuple(routes.shape)} but this MoE layer routes "
                    f"{scores.shape[0]} tokens to top_k={self.top_k} experts: record them on the same "
                    "token sequence with the same model config"
                )
            topk_idx = routes.to(device=scores.device, dtype=torch.long)
        topk_scores = scores.gather(-1, topk_idx)
        topk_weight = topk_scores / topk_scores.sum(-1, keepdim=True) * self.routed_scaling_factor
        return Routing(scores, topk_idx, router_topk), topk_weight


class Experts(nn.Module):
    """Routed experts, stacked: up (E, I, D), down (E, D, I) with D the latent (or hidden) width."""

    def __init__(self, num_experts: int, dim: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, intermediate_size))
        self.linear_fn: Optional[LinearFn] = None  # set by precision emulation: every expert GEMM goes through it
        self.alignment = 1  # rows per expert padded to this (16/32/128 for low-precision GEMMs)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        return moe_experts(
            x, topk_idx, topk_weight, self.up_proj, self.down_proj, alignment=self.alignment, linear_fn=self.linear_fn
        )


class LatentMoE(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_experts = cfg.num_experts
        self.gate = Router(cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.routed_scaling_factor)
        latent = cfg.moe_latent_size
        self.fc1_latent_proj = nn.Linear(cfg.hidden_size, latent, bias=False) if latent else None
        self.fc2_latent_proj = nn.Linear(latent, cfg.hidden_size, bias=False) if latent else None
        # an nn.Module: expert parallelism swaps in a drop-in with the same parameters and forward
        # (train/parallel/expert_parallel.py)
        self.experts: nn.Module = Experts(cfg.num_experts, cfg.expert_dim, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: Optional[torch.Tensor] = None,
        state: Optional[LayerState] = None,
        context: Optional[MixerContext] = None,
        routes: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Routing]:
        """-> (output, Routing) over the tokens of x (..., H) in order. `routes` (..., top_k): replayed experts."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing, topk_weight = self.gate(flat, None if routes is None else routes.reshape(-1, routes.shape[-1]))
        routed_in = self.fc1_latent_proj(flat) if self.fc1_latent_proj is not None else flat
        routed = self.experts(routed_in, routing.topk_idx, topk_weight.to(routed_in.dtype))
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)
        return routed.view(shape) + self.shared_experts(x), routing

    @torch.no_grad()
    def update_bias(self, global_load: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded ones."""
        load = global_load.float().to(self.gate.e_score_correction_bias.device)
        self.gate.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate.weight, std=std)
        self.gate.e_score_correction_bias.zero_()
        nn.init.normal_(self.experts.get_parameter("up_proj"), std=std)
        nn.init.normal_(self.experts.get_parameter("down_proj"), std=out_std)
        for projection, projection_std in ((self.fc1_latent_proj, std), (self.fc2_latent_proj, out_std)):
            if projection is not None:  # both exist or neither (moe_latent_size)
                nn.init.normal_(projection.weight, std=projection_std)
        self.shared_experts.init_weights(std, out_std)


# ----- rollout routing replay (R3) ----------------------------------------------------------------------------------
# HybridModel.forward returns the experts each trunk MoE layer chose (`ModelOutput.routes`, (b, s, layers, top_k))
# and replays recorded ones (`routes=`); the MTP block's MoE trains on detached features and routes by itself.
def router_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of (token, layer) pairs whose top-k expert sets match in two routes tensors (..., top_k)."""
    same = (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)
    return float(same.float().mean())
