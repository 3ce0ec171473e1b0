"""Decode-time path of the MoE layers, reading the model's own parameters."""

from __future__ import annotations

from typing import Optional
import torch


# Few tokens (decode, verify): the module's grouped path loops over every expert. Below these sizes it is cheaper
# to run all experts densely (tiny models: a handful of GEMMs in place of one per expert) or to gather the chosen
# experts' weights; above both the module's own (grouped GEMM) path runs.
DENSE_EXPERTS_MAX_MACS = 1 << 24
GATHER_EXPERTS_MAX_ELEMENTS = 1 << 22


def moe_inference(moe, x: torch.Tensor, routes: Optional[list] = None) -> torch.Tensor:
    """LatentMoE over the tokens of a decode or verify step, same math as `model.moe.LatentMoE.forward`.

    The router, latent projections and shared expert are the module's own. Inference needs neither the balance
    loss nor the load counters, so they are not computed. Precision emulation (`experts.linear_fn`) takes the
    module's path. `routes`: a list that gets the (tokens, top_k) expert ids chosen (rollout routing replay).
    """
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    experts = moe.experts
    tokens, top_k = flat.shape[0], moe.gate.top_k
    num_experts, intermediate, dim = experts.up_proj.shape
    dense = tokens * num_experts * intermediate * dim <= DENSE_EXPERTS_MAX_MACS
    gather = tokens * top_k * intermediate * dim <= GATHER_EXPERTS_MAX_ELEMENTS
    if experts.linear_fn is not None or not (dense or gather):
        if routes is not None:
            routes.append(moe.gate(flat)[1])  # the module's forward keeps its choice; the router is deterministic
        return moe(flat).view(shape)  # 2-D input: the module skips its sequence balance loss
    _, topk_idx, topk_weight = moe.gate(flat)
    if routes is not None:
        routes.append(topk_idx)
    routed_in = moe.fc1_latent_proj(flat) if moe.fc1_latent_proj is not None else flat
    cdt = torch.float64 if routed_in.dtype == torch.float64 else torch.float32
    if dense:
        # every expert on every token; the routing weight is 0 for experts a token did not choose
        h = torch.matmul(routed_in, experts.up_proj.reshape(num_experts * intermediate, dim).t())
        h = h.view(tokens, num_experts, intermediate)
        weight = torch.zeros(tokens, num_experts, dtype=cdt, device=flat.device).scatter_(1, topk_idx,
                                                                                         topk_weight.to(cdt))
        h = (torch.relu(h.to(cdt)).square() * weight[..., None]).to(routed_in.dtype)
        routed = torch.bmm(h.transpose(0, 1), experts.down_proj.transpose(1, 2))  # (E, T, D)
    else:
        up = experts.up_proj[topk_idx]  # (T, k, I, D)
        h = torch.matmul(up, routed_in[:, None, :, None]).squeeze(-1)  # (T, k, I)
        h = (torch.relu(h.to(cdt)).square() * topk_weight.to(cdt)[..., None]).to(routed_in.dtype)
        routed = torch.matmul(experts.down_proj[topk_idx], h[..., None]).squeeze(-1).transpose(0, 1)  # (k, T, D)
    routed = routed.to(cdt).sum(0).to(flat.dtype)
    if moe.fc2_latent_proj is not None:
        routed = moe.fc2_latent_proj(routed)
    return (routed + moe.shared_experts(flat)).view(shape)
