"""Decode-time paths of the stateful layers, reading the model's own parameters.

Prefill goes through the model's mixers (the chunked SSD scan of `kernels/`). Decode and draft verification feed
a handful of tokens per row, where the chunked scan would pad every call to a whole chunk: here the Mamba-2 mixer
runs its recurrence token by token instead (SPEC section 3),

    h_t = exp(dt_t * A) h_{t-1} + dt_t * x_t (outer) B_t ,   y_t = <h_t, C_t> + D * x_t ,

and can keep the conv and SSM state after *every* fed token, so that a partially accepted draft rolls back by
picking the state after the last accepted token (no re-run of the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional
import torch
import torch.nn.functional as F


@dataclass
class MambaStates:
    """States after fed tokens. Final: conv (b, c, K-1), ssm (b, h, p, n). Per position: one more dim s at 1."""

    conv: torch.Tensor
    ssm: torch.Tensor
    per_position: bool

    def select(self, index: torch.Tensor) -> "MambaStates":
        """Per-position states -> the states after token `index[row]` of each row."""
        if not self.per_position:
            raise ValueError("select() needs the per-position states (keep_positions=True)")
        rows = torch.arange(index.shape[0], device=index.device)
        return MambaStates(self.conv[rows, index], self.ssm[rows, index], per_position=False)


def mamba_recurrent(mixer, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
                    keep_positions: bool = False):
    """One Mamba-2 mixer over s new tokens per row, token by token, from (conv_state, ssm_state).

    x (b, s, H) is the normed block input. Returns (out (b, s, H), MambaStates): the states after the last token,
    or (keep_positions) after every token: conv (b, s, c, K-1), ssm (b, s, h, p, n). The inputs are not modified.
    Arithmetic follows the mixer: conv in fp32 (fp64 for fp64 models), state in the dtype of `ssm_state`.
    """
    b, s, _ = x.shape
    heads = mixer.dt_bias.shape[0]
    head_dim = mixer.head_dim
    d_inner = heads * head_dim
    conv_dim, _, width = mixer.conv1d.weight.shape
    bc_size = (conv_dim - d_inner) // 2
    groups = bc_size // mixer.state_size
    cdt = torch.float64 if ssm_state.dtype == torch.float64 else torch.float32

    z, xbc, dt = mixer.in_proj(x).split([d_inner, d_inner + 2 * bc_size, heads], dim=-1)

    # causal depthwise conv: the K-1 cached inputs, then the new ones; the state after token j is the window
    # of the K-1 inputs ending at j (pre-activation, as kernels.conv1d keeps it)
    history = torch.cat([conv_state.transpose(1, 2).to(xbc.dtype), xbc], dim=1)  # (b, K-1+s, c)
    windows = history.unfold(1, width, 1)  # (b, s, c, K)
    weight = mixer.conv1d.weight.squeeze(1).to(cdt)
    conv = (windows.to(cdt) * weight).sum(-1) + mixer.conv1d.bias.to(cdt)
    xbc_act = F.silu(conv).to(xbc.dtype)
    if keep_positions:
        conv_states = history.unfold(1, width - 1, 1)[:, 1:]  # (b, s, c, K-1)
    else:
        conv_states = history[:, s:].transpose(1, 2)  # (b, c, K-1)
    conv_states = conv_states.to(conv_state.dtype)

    xs, B, C = xbc_act.split([d_inner, bc_size, bc_size], dim=-1)
    per_group = heads // groups
    # grouped views, no copies: head i = (group i // per_group, member i % per_group) reads that group's B and C
    xs = xs.to(cdt).view(b, s, groups, per_group, head_dim)
    B = B.to(cdt).view(b, s, groups, 1, 1, mixer.state_size)
    C = C.to(cdt).view(b, s, groups, 1, 1, mixer.state_size)
    # dt and A rounded through fp32 exactly as the mixer does (so fp64 test models agree to rounding)
    dt = F.softplus(dt.float() + mixer.dt_bias.float()).to(cdt).view(b, s, groups, per_group, 1)  # no clamp
    A = (-torch.exp(mixer.A_log.float())).to(cdt).view(groups, per_group, 1)
    decay = torch.exp(dt * A).unsqueeze(-1)  # (b, s, g, r, 1, 1)
    dtx = (dt * xs).unsqueeze(-1)  # (b, s, g, r, p, 1)

    state = ssm_state.to(cdt).view(b, groups, per_group, head_dim, mixer.state_size)
    ys, states = [], []
    for t in range(s):
        state = state * decay[:, t] + dtx[:, t] * B[:, t]
        ys.append((state * C[:, t]).sum(-1))
        if keep_positions:
            states.append(state)
    y = (ys[0].unsqueeze(1) if s == 1 else torch.stack(ys, dim=1)) + mixer.D.to(cdt).view(groups, per_group, 1) * xs
    ssm = torch.stack(states, dim=1).view(b, s, heads, head_dim, -1) if keep_positions else state.view(ssm_state.shape)
    y = mixer.norm(y.reshape(b, s, d_inner).to(x.dtype), z)
    return mixer.out_proj(y), MambaStates(conv_states, ssm.to(ssm_state.dtype), keep_positions)


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
