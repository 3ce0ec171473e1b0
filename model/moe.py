"""LatentMoE (SPEC section 3): sigmoid router on the full hidden state, expert-bias top-k, routed experts in a
latent space (down-projected from hidden), and one shared expert at full width.

After each forward the layer keeps two things the model collects: `aux_loss` (the sequence-level balance loss,
with its graph) and `load` (tokens per expert, detached), which the trainer sums over data-parallel ranks and
feeds back through `update_bias` (aux-loss-free balancing).
"""

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.kernels.moe import moe_experts

from .mlp import MLP


class Router(nn.Module):
    """fp32 sigmoid scores; the expert bias only chooses the experts, the weights use the unbiased scores."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, routed_scaling_factor: float):
        super().__init__()
        self.top_k = top_k
        self.routed_scaling_factor = routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # a buffer: trained by the balancing rule, never by gradient, and saved with the checkpoint
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor):
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32 under mixed precision
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        _, topk_idx = torch.topk(scores + self.e_score_correction_bias.float(), self.top_k, dim=-1)
        topk_scores = scores.gather(-1, topk_idx)
        topk_weight = topk_scores / topk_scores.sum(-1, keepdim=True) * self.routed_scaling_factor
        return scores, topk_idx, topk_weight


class Experts(nn.Module):
    """Routed experts, stacked: up (E, I, D), down (E, D, I) with D the latent (or hidden) width."""

    def __init__(self, num_experts: int, dim: int, intermediate_size: int):
        super().__init__()
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, intermediate_size))
        self.linear_fn = None  # set by precision emulation: every expert GEMM goes through it
        self.alignment = 1  # rows per expert padded to this (16/32/128 for low-precision GEMMs)

    def forward(self, x, topk_idx, topk_weight):
        return moe_experts(x, topk_idx, topk_weight, self.up_proj, self.down_proj,
                           alignment=self.alignment, linear_fn=self.linear_fn)


def sequence_aux_loss(scores: torch.Tensor, topk_idx: torch.Tensor, batch: int, num_experts: int) -> torch.Tensor:
    """Sequence-level balance loss (DeepSeek-V3): per sequence, sum_e f_e * P_e, averaged over sequences.

    f_e = E / (k * T) * (tokens routed to e), P_e = mean over tokens of the normalised score of e.
    """
    tokens, top_k = topk_idx.shape
    seq_len = tokens // batch
    chosen = torch.zeros(batch, seq_len, num_experts, device=scores.device, dtype=scores.dtype)
    chosen.scatter_(-1, topk_idx.view(batch, seq_len, top_k), 1.0)
    f = chosen.sum(1) * (num_experts / (top_k * seq_len))
    p = (scores / scores.sum(-1, keepdim=True)).view(batch, seq_len, num_experts).mean(1)
    return (f * p).sum(-1).mean()


class LatentMoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.gate = Router(cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.routed_scaling_factor)
        latent = cfg.moe_latent_size
        self.fc1_latent_proj = nn.Linear(cfg.hidden_size, latent, bias=False) if latent else None
        self.fc2_latent_proj = nn.Linear(latent, cfg.hidden_size, bias=False) if latent else None
        self.experts = Experts(cfg.num_experts, cfg.expert_dim, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.aux_loss = None
        self.load = None

    def forward(self, x: torch.Tensor, seq_idx=None, state=None) -> torch.Tensor:
        shape = x.shape
        routed, scores, topk_idx = self.routed(x.reshape(-1, shape[-1]))
        self.aux_loss = sequence_aux_loss(scores, topk_idx, shape[0], self.num_experts) if len(shape) == 3 else None
        return routed.view(shape) + self.shared_experts(x)

    def routed(self, flat: torch.Tensor):
        """The routed half on (tokens, H): router, latent down-projection, experts, latent up-projection; records
        the expert load. Returns (output, scores, topk_idx). The tensor-parallel forward reuses it."""
        scores, topk_idx, topk_weight = self.gate(flat)
        routed_in = self.fc1_latent_proj(flat) if self.fc1_latent_proj is not None else flat
        routed = self.experts(routed_in, topk_idx, topk_weight.to(routed_in.dtype))
        if self.fc2_latent_proj is not None:
            routed = self.fc2_latent_proj(routed)
        self.load = torch.bincount(topk_idx.flatten(), minlength=self.num_experts).detach()
        return routed, scores, topk_idx

    @torch.no_grad()
    def update_bias(self, global_load: torch.Tensor, rate: float):
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded ones."""
        load = global_load.float().to(self.gate.e_score_correction_bias.device)
        self.gate.e_score_correction_bias.add_(rate * torch.sign(load.mean() - load))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float):
        nn.init.normal_(self.gate.weight, std=std)
        self.gate.e_score_correction_bias.zero_()
        nn.init.normal_(self.experts.up_proj, std=std)
        nn.init.normal_(self.experts.down_proj, std=out_std)
        if self.fc1_latent_proj is not None:
            nn.init.normal_(self.fc1_latent_proj.weight, std=std)
            nn.init.normal_(self.fc2_latent_proj.weight, std=out_std)
        self.shared_experts.init_weights(std, out_std)
