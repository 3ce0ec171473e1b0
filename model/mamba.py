"""The Mamba-2 mixer (SPEC section 3), over the chunked SSD scan and causal conv1d of `kernels/`.

`state` (inference only) is a dict {"conv": (b, conv_dim, K-1), "ssm": (b, heads, head_dim, state) fp32}: the scan
starts from it and it is replaced by the states after the last token, so prefill and decode share one code path.
A decode state (`"recurrent": True`, a few tokens: decoding, draft verification) takes the recurrence token by
token instead of the chunked scan (which pads every call to a whole chunk); with `"keep_per_token": True` the
states after every token go to "conv_per_token" (b, s, conv_dim, K-1) and "ssm_per_token" (a
`kernels.ssd_verify.TokenStates`: the SSM state after any token, built on `select` for large states) and
"conv" / "ssm" stay as they were, so a rejected draft rolls back by picking one.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from latentforge.kernels.conv1d import causal_conv1d, causal_conv1d_update
from latentforge.kernels.ssd import ssd_scan, ssd_update
from latentforge.kernels.ssd_verify import TokenStates, ssd_verify

from .config import ModelConfig
from .mixer_types import LayerState, MixerContext
from .norm import GatedRMSNorm
from .shards import local_tensor


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.mamba_num_heads
        self.head_dim = cfg.mamba_head_dim
        self.groups = cfg.mamba_groups
        self.state_size = cfg.ssm_state_size
        self.chunk_size = cfg.chunk_size
        self.time_step_range = (cfg.time_step_min, cfg.time_step_max, cfg.time_step_floor)
        self.a_init_range = cfg.a_init_range
        d_inner = cfg.mamba_d_inner
        conv_dim = cfg.mamba_conv_dim
        self.in_proj = nn.Linear(cfg.hidden_size, cfg.mamba_in_proj_size, bias=False)  # z | x | B | C | dt
        # nn.Conv1d only holds the (channels, 1, K) weight and bias in the checkpoint's layout; the op is kernels'
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.conv_kernel, groups=conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads))
        self.A_log = nn.Parameter(torch.empty(self.num_heads))
        self.D = nn.Parameter(torch.empty(self.num_heads))
        self.norm = GatedRMSNorm(d_inner, group_size=d_inner // self.groups, eps=cfg.norm_eps)
        self.out_proj = nn.Linear(d_inner, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: Optional[torch.Tensor] = None,
        state: Optional[LayerState] = None,
        context: Optional[MixerContext] = None,
    ) -> torch.Tensor:
        """x (b, s, H) -> (b, s, H). `state`: cached decoding (module doc). `context`: context parallelism (a
        train.parallel object holding this rank's chunks of the sequence): it runs the conv and the scan of those
        chunks with the states entering each from the others, through the steps below."""
        z, xbc, dt = self.project(x)
        if context is not None:
            y = context.mamba_mix(self, xbc, dt)
        elif state is not None and state.get("recurrent"):
            y = self.recurrent_mix(xbc, dt, state)
        else:
            xbc, conv_state = self.convolve(xbc, seq_idx, None if state is None else state["conv"])
            xs, B, C, dt, A = self.ssm_inputs(xbc, dt)
            y, ssm_state = self.scan(xs, dt, A, B, C, seq_idx, None if state is None else state["ssm"])
            if state is not None:
                state["conv"], state["ssm"] = conv_state.to(state["conv"].dtype), ssm_state
        return self.gate_and_project(y, z)

    # ----- the named steps: context parallelism and cached decoding reuse them ------------------------------------
    def sizes(self) -> tuple[int, int, int, int]:
        """(heads, d_inner, B/C width, groups) of the weights this module holds: a tensor-parallel shard holds
        fewer heads and groups and runs the same steps."""
        heads = local_tensor(self.dt_bias).shape[0]
        d_inner = heads * self.head_dim
        bc_size = (local_tensor(self.conv1d.weight).shape[0] - d_inner) // 2
        return heads, d_inner, bc_size, bc_size // self.state_size

    def in_proj_blocks(self) -> list[int]:
        """Row counts of in_proj's blocks z | x | B | C | dt in the full model; tensor parallelism gives each rank
        an equal slice of every block."""
        d_inner, bc_size = self.num_heads * self.head_dim, self.groups * self.state_size
        return [d_inner, d_inner, bc_size, bc_size, self.num_heads]

    def conv_blocks(self) -> list[int]:
        """Channel counts of conv1d's blocks x | B | C in the full model."""
        return self.in_proj_blocks()[1:4]

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """in_proj, split into the gate z (b, s, d_inner), the conv input x|B|C and the raw time step dt."""
        heads, d_inner, bc_size, _ = self.sizes()
        return self.in_proj(x).split([d_inner, d_inner + 2 * bc_size, heads], dim=-1)

    def conv_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """conv1d's (channels, K) weight and (channels,) bias: this rank's shard under tensor parallelism."""
        bias = self.conv1d.bias
        assert bias is not None, "conv1d is built with bias=True"
        return local_tensor(self.conv1d.weight).squeeze(1), local_tensor(bias)

    def convolve(
        self, xbc: torch.Tensor, seq_idx: Optional[torch.Tensor] = None, initial_state: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv + SiLU; returns (activated x|B|C, the conv state after the last token)."""
        return causal_conv1d(
            xbc,
            *self.conv_weights(),
            seq_idx=seq_idx,
            initial_state=initial_state,
            activation="silu",
        )

    def ssm_inputs(
        self, xbc: torch.Tensor, dt: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x (b, s, h, p), B, C (b, s, g, n), dt (b, s, h) fp32 after softplus, A (h,) fp32)."""
        heads, d_inner, bc_size, groups = self.sizes()
        b, s = xbc.shape[:2]
        xs, B, C = xbc.split([d_inner, bc_size, bc_size], dim=-1)
        dt = F.softplus(dt.float() + local_tensor(self.dt_bias).float())  # no clamp in training (SPEC)
        A = -torch.exp(local_tensor(self.A_log).float())
        return (
            xs.reshape(b, s, heads, self.head_dim),
            B.reshape(b, s, groups, self.state_size),
            C.reshape(b, s, groups, self.state_size),
            dt,
            A,
        )

    def scan(
        self,
        xs: torch.Tensor,
        dt: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        seq_idx: Optional[torch.Tensor] = None,
        initial_state: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunked SSD scan (with the D skip); returns (y (b, s, h, p), the SSM state after the last token)."""
        return ssd_scan(
            xs,
            dt,
            A,
            B,
            C,
            D=local_tensor(self.D),
            chunk_size=self.chunk_size,
            seq_idx=seq_idx,
            initial_state=initial_state,
        )

    def recurrent_mix(self, xbc: torch.Tensor, dt: torch.Tensor, state: LayerState) -> torch.Tensor:
        """Conv + SSM of a decode state (module doc) with the kernels' decode steps; returns y (b, s, h, p)."""
        per_token = bool(state.get("keep_per_token"))
        xbc, conv_state = causal_conv1d_update(
            xbc,
            *self.conv_weights(),
            conv_state=state["conv"],
            activation="silu",
            per_token_states=per_token,
        )
        xs, B, C, dt, A = self.ssm_inputs(xbc, dt)
        ssm_state: torch.Tensor | TokenStates
        if per_token:  # draft verification: only the state after the row's last accepted token is ever built
            y, ssm_state = ssd_verify(xs, dt, A, B, C, D=local_tensor(self.D), state=state["ssm"])
        else:
            y, ssm_state = ssd_update(xs, dt, A, B, C, D=local_tensor(self.D), state=state["ssm"])
        suffix = "_per_token" if per_token else ""
        state["conv" + suffix], state["ssm" + suffix] = conv_state, ssm_state
        return y

    def gate_and_project(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Gated RMSNorm of y (b, s, h, p) by z, then out_proj."""
        b, s = y.shape[:2]
        return self.out_proj(self.norm(y.reshape(b, s, -1), z))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.in_proj.weight, std=std)
        nn.init.normal_(self.out_proj.weight, std=out_std)
        self.conv1d.reset_parameters()  # PyTorch's default (kaiming-uniform), as mamba_ssm and Megatron keep it
        lo, hi = self.a_init_range
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(lo, hi).log())
        dt_min, dt_max, dt_floor = self.time_step_range
        u = torch.rand(self.num_heads, device=self.dt_bias.device, dtype=torch.float32)
        dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.D.fill_(1.0)
        self.norm.init_weights()
