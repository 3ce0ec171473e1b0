"""LatentMoE (SPEC section 3): sigmoid router on the full hidden state, expert-bias top-k, routed experts in a
latent space (down-projected from hidden), and one shared expert at full width.

After each forward the layer keeps two things the model collects: `aux_loss` (the sequence-level balance loss,
with its graph) and `load` (tokens per expert, detached), which the trainer sums over data-parallel ranks and
feeds back through `update_bias` (aux-loss-free balancing).
"""

import contextlib
from typing import Optional

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

    def forward(self, x: torch.Tensor, forced_topk: Optional[torch.Tensor] = None):
        """`forced_topk` (tokens, top_k): use these experts instead of choosing (rollout routing replay); the
        weights still come from this router's own scores, so its gradient flows."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32 under mixed precision
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        if forced_topk is None:
            _, topk_idx = torch.topk(scores + self.e_score_correction_bias.float(), self.top_k, dim=-1)
        else:
            if tuple(forced_topk.shape) != (scores.shape[0], self.top_k):
                raise ValueError(f"replayed routes have shape {tuple(forced_topk.shape)} but this MoE layer routes "
                                 f"{scores.shape[0]} tokens to top_k={self.top_k} experts: record them on the same "
                                 "token sequence with the same model config")
            topk_idx = forced_topk.to(device=scores.device, dtype=torch.long)
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

    def forward(self, x: torch.Tensor, seq_idx=None, state=None, context=None, forced_topk=None) -> torch.Tensor:
        shape = x.shape
        routed, scores, topk_idx = self.routed(x.reshape(-1, shape[-1]), forced_topk)
        self.aux_loss = sequence_aux_loss(scores, topk_idx, shape[0], self.num_experts) if len(shape) == 3 else None
        return routed.view(shape) + self.shared_experts(x)

    def routed(self, flat: torch.Tensor, forced_topk: Optional[torch.Tensor] = None):
        """The routed half on (tokens, H): router, latent down-projection, experts, latent up-projection; records
        the expert load. Returns (output, scores, topk_idx). The tensor-parallel forward reuses it.
        `forced_topk`: replayed expert ids (Router.forward)."""
        scores, topk_idx, topk_weight = self.gate(flat, forced_topk)
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


# ----- rollout routing replay (R3) ----------------------------------------------------------------------------------
def moe_layers(model: nn.Module) -> list:
    """The trunk's LatentMoE layers in forward order (the layer axis of a routes tensor). The MTP block's MoE
    trains on detached features and is not replayed: it routes by itself."""
    trunk = getattr(model, "backbone", model)
    return [m for m in trunk.modules() if isinstance(m, LatentMoE)]


@contextlib.contextmanager
def record_routing(model: nn.Module):
    """Within the block, each router call appends the (tokens, top_k) expert ids it chose: yields one list per
    MoE layer (routes_tensor turns them into the (b, s, layers, top_k) that replay_routing takes)."""
    layers = moe_layers(model)
    chosen = [[] for _ in layers]

    def keep(i):
        return lambda module, inputs, outputs: chosen[i].append(outputs[1].detach())

    handles = [m.gate.register_forward_hook(keep(i)) for i, m in enumerate(layers)]
    try:
        yield chosen
    finally:
        for handle in handles:
            handle.remove()


def routes_tensor(chosen: list, batch: int, seq_len: int) -> torch.Tensor:
    """record_routing's lists of one (b, s) forward -> (b, s, layers, top_k) expert ids."""
    per_layer = [torch.cat(calls).view(batch, seq_len, -1) for calls in chosen]
    return torch.stack(per_layer, dim=2)


@contextlib.contextmanager
def replay_routing(model: nn.Module, routes: torch.Tensor):
    """Within the block, a (b, s) forward of `model` routes each token of each MoE layer to the experts in
    `routes` (b, s, layers, top_k), with gate weights from its own router scores (a forward pre-hook fills
    LatentMoE.forward's `forced_topk`: the one model forward, not a second one)."""
    layers = moe_layers(model)
    if routes.dim() != 4 or routes.shape[2] != len(layers):
        raise ValueError(f"routes must be (batch, seq, {len(layers)} MoE layers, top_k), got {tuple(routes.shape)}")

    def force(i):
        def hook(module, args, kwargs):
            return args, {**kwargs, "forced_topk": routes[:, :, i].reshape(-1, routes.shape[-1])}
        return hook

    handles = [m.register_forward_pre_hook(force(i), with_kwargs=True) for i, m in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def router_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of (token, layer) pairs whose top-k expert sets match in two routes tensors (..., top_k)."""
    same = (a.sort(dim=-1).values == b.sort(dim=-1).values).all(dim=-1)
    return float(same.float().mean())
