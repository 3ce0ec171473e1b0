"""Tensor/sequence- and context-parallel forwards of the mixers, and the sharding of their weights.

Between blocks every rank holds its own slice of the sequence (b, s / (cp * tp), H): the context-parallel chunk,
then the sequence-parallel piece of it. A tensor-parallel mixer all-gathers the pieces of its CP chunk over the TP
group, runs its share of heads (column-parallel projections), and reduce-scatters the row-parallel output back to
pieces (Megatron's sequence parallelism). Context parallelism then adds, per mixer kind:
  attention  keys/values all-gathered over the CP group, masked causally and per document at global positions;
  Mamba      the conv history and the SSM state handed from CP rank r-1 to rank r (exact, document resets kept).
MoE routes its own tokens (no gather); only its shared expert is column/row split. The router, the latent
projections and the routed experts stay whole on every TP rank (experts can be split by expert parallelism).

Sharded weights are DTensors on the TP mesh with the unsharded model's names and global shapes, so a checkpoint
written in one layout loads in any other. Column-parallel weights are `Shard(0)`, row-parallel ones `Shard(1)`.
Mamba's `in_proj` (rows z | x | B | C | dt) and `conv1d` (channels x | B | C) hold five (three) blocks per rank
that are not contiguous: they are stored `Shard(0)` in the natural order and each rank gathers its rows at
forward time (an all-gather of that weight; its gradient is reduce-scattered back).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from latentforge.kernels.conv1d import causal_conv1d
from latentforge.kernels.rmsnorm import gated_rms_norm
from latentforge.kernels.ssd import ssd_scan
from latentforge.model.attention import Attention, document_causal_mask
from latentforge.model.mamba import Mamba2Mixer
from latentforge.model.mlp import MLP, squared_relu
from latentforge.model.moe import LatentMoE

from .collectives import from_previous_rank, gather_along, keep_in_graph, scatter_along


# ----- weights -------------------------------------------------------------------------------------------------
def local(p: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly DTensor) parameter, differentiable."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def gathered_rows(p: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` of the full tensor behind a Shard(0) DTensor (all-gather; gradient reduce-scattered)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if not isinstance(p, DTensor):
        return p.index_select(0, rows)
    full = p.redistribute(p.device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    return full.index_select(0, rows)


def shard_parameter(module: nn.Module, name: str, mesh, dim: int, src_data_rank=0):
    """Replace `module.<name>` by a DTensor Shard(dim) parameter over `mesh` (same name, global shape).

    `src_data_rank` 0 takes rank 0's values; None takes each rank's own copy (no communication: every rank built
    the same tensor)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    param = getattr(module, name)
    sharded = distribute_tensor(param.data, mesh, [Shard(dim)], src_data_rank=src_data_rank)
    if src_data_rank is None:
        # the local shard may be a view of the full tensor: own it, so the full one can be freed
        from torch.distributed.tensor import DTensor

        sharded = DTensor.from_local(sharded.to_local().clone(), mesh, [Shard(dim)], run_check=False,
                                     shape=param.shape, stride=param.stride())
    setattr(module, name, nn.Parameter(sharded, requires_grad=param.requires_grad))


def call_linear(linear: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`linear(x)` with `weight` in place of its weight: runs the module's own forward (a precision recipe may
    have swapped it), on this rank's shard."""
    return functional_call(linear, {"weight": weight}, (x,))


# ----- context ---------------------------------------------------------------------------------------------------
class _Comm:
    """What a parallel mixer needs to know: the groups, and the micro-batch being run (from the context)."""

    def __init__(self, ctx):
        self.ctx = ctx
        groups = ctx.groups
        self.tp_group, self.cp_group = groups.tp_group, groups.cp_group
        self.tp, self.cp = ctx.tp, ctx.cp
        self.cp_rank = groups.cp_rank

    def gather_tp(self, x):
        return gather_along(x, 1, self.tp_group)

    def scatter_tp(self, x):
        return scatter_along(x, 1, self.tp_group)


# ----- attention ---------------------------------------------------------------------------------------------------
def attention_forward(self: Attention, x, seq_idx=None, state=None):
    comm: _Comm = self._lf_comm
    mb = comm.ctx.current
    xg = comm.gather_tp(x)  # (b, s_cp, H): this CP chunk
    b, s, _ = xg.shape
    d = self.head_dim
    q = call_linear(self.q_proj, xg, local(self.q_proj.weight)).view(b, s, -1, d).transpose(1, 2)
    k = call_linear(self.k_proj, xg, local(self.k_proj.weight))
    v = call_linear(self.v_proj, xg, local(self.v_proj.weight))
    if comm.cp > 1:
        # every CP rank's keys/values: (b, S, kv * d); queries stay local
        k, v = gather_along(k, 1, comm.cp_group), gather_along(v, 1, comm.cp_group)
        mask = _cp_mask(mb.seq_full, comm.cp_rank * s, s)
    else:
        mask = document_causal_mask(mb.seq_cp)
    k = k.view(b, k.shape[1], -1, d).transpose(1, 2)
    v = v.view(b, v.shape[1], -1, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = call_linear(self.o_proj, out.transpose(1, 2).reshape(b, s, -1), local(self.o_proj.weight))
    return comm.scatter_tp(out)


def _cp_mask(seq_full: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """(b, 1, length, S): query start+i may see key j when j <= start+i and both are in the same document."""
    S = seq_full.shape[1]
    q_pos = torch.arange(start, start + length, device=seq_full.device)
    causal = torch.arange(S, device=seq_full.device)[None, :] <= q_pos[:, None]
    same_doc = seq_full[:, start:start + length, None] == seq_full[:, None, :]
    return (causal[None] & same_doc)[:, None]


# ----- Mamba -----------------------------------------------------------------------------------------------------
def mamba_forward(self: Mamba2Mixer, x, seq_idx=None, state=None):
    comm: _Comm = self._lf_comm
    mb = comm.ctx.current
    xg = comm.gather_tp(x)
    b, s, _ = xg.shape
    in_w = gathered_rows(self.in_proj.weight, self._lf_in_rows) if comm.tp > 1 else self.in_proj.weight
    conv_w = self.conv1d.weight
    conv_b = self.conv1d.bias
    if comm.tp > 1:
        conv_w, conv_b = gathered_rows(conv_w, self._lf_conv_rows), gathered_rows(conv_b, self._lf_conv_rows)
    dt_bias, A_log, D = local(self.dt_bias), local(self.A_log), local(self.D)
    heads = dt_bias.shape[0]
    d_inner = heads * self.head_dim
    bc_size = (conv_w.shape[0] - d_inner) // 2
    z, xbc, dt = call_linear(self.in_proj, xg, in_w).split([d_inner, d_inner + 2 * bc_size, heads], dim=-1)
    conv_history = _cp_conv_history(xbc, mb, comm, conv_w.shape[-1]) if comm.cp > 1 else None
    xbc, _ = causal_conv1d(xbc, conv_w.squeeze(1), conv_b, seq_idx=mb.seq_cp, initial_state=conv_history,
                           activation="silu")
    xs, B, C = xbc.split([d_inner, bc_size, bc_size], dim=-1)
    groups = bc_size // self.state_size
    dt = F.softplus(dt.float() + dt_bias.float())
    A = -torch.exp(A_log.float())
    xs = xs.reshape(b, s, heads, self.head_dim)
    B = B.reshape(b, s, groups, self.state_size)
    C = C.reshape(b, s, groups, self.state_size)
    initial = _cp_ssm_state(xs, dt, A, B, C, mb, comm, self.chunk_size) if comm.cp > 1 else None
    y, _ = ssd_scan(xs, dt, A, B, C, D=D, chunk_size=self.chunk_size, seq_idx=mb.seq_cp, initial_state=initial)
    y = gated_rms_norm(y.reshape(b, s, d_inner), z, local(self.norm.weight), self.norm.group_size, self.norm.eps)
    out = call_linear(self.out_proj, y, local(self.out_proj.weight))
    return comm.scatter_tp(out)


def _cp_conv_history(xbc, mb, comm, kernel: int):
    """The k-1 conv inputs before this CP chunk (rank r-1's last ones), zeroed where they belong to another
    document than this chunk's first token (the conv kernel applies a history to the row's first document)."""
    keep = kernel - 1
    history = from_previous_rank(xbc[:, -keep:], comm.cp_group)  # (b, k-1, c)
    start = comm.cp_rank * xbc.shape[1]
    if start > 0:
        same_doc = mb.seq_full[:, start - keep:start] == mb.seq_full[:, start:start + 1]
        history = history * same_doc.unsqueeze(-1).to(history.dtype)
    return history.transpose(1, 2)


def _cp_ssm_state(xs, dt, A, B, C, mb, comm, chunk_size):
    """The exact SSM state entering this CP chunk.

    Each rank scans its chunk from a zero state (final state F0_j) and computes how much of an incoming state
    survives to its end (decay a_j = exp(sum dt A), 0 if a document starts inside the chunk). With the chunks of
    all ranks gathered: S_0 = 0, S_{j+1} = (F0_j + a_j S_j) if chunk j+1 continues chunk j's last document else 0.
    """
    b, s = dt.shape[:2]
    _, zero_start_final = ssd_scan(xs, dt, A, B, C, D=None, chunk_size=chunk_size, seq_idx=mb.seq_cp)
    seq = mb.seq_cp
    one_doc = (seq[:, 0] == seq[:, -1]).to(dt.dtype)  # (b,)
    decay = torch.exp((dt * A).sum(1)) * one_doc[:, None]  # (b, h)
    finals = gather_along(zero_start_final.unsqueeze(0), 0, comm.cp_group)  # (cp, b, h, p, n)
    decays = gather_along(decay.unsqueeze(0), 0, comm.cp_group)  # (cp, b, h)
    state = torch.zeros_like(zero_start_final)
    for j in range(comm.cp_rank):
        state = finals[j] + decays[j][..., None, None] * state
        continues = mb.seq_full[:, (j + 1) * s - 1] == mb.seq_full[:, (j + 1) * s]
        state = state * continues.to(state.dtype)[:, None, None, None]
    if comm.cp_rank == 0:
        state = keep_in_graph(keep_in_graph(state, finals), decays)
    return state


# ----- MLP and MoE -------------------------------------------------------------------------------------------------
def _tp_mlp(mlp: MLP, x, comm: _Comm):
    """Column-parallel up, row-parallel down, on the gathered CP chunk; returns this rank's sequence piece."""
    xg = comm.gather_tp(x)
    h = squared_relu(call_linear(mlp.up_proj, xg, local(mlp.up_proj.weight)))
    return comm.scatter_tp(call_linear(mlp.down_proj, h, local(mlp.down_proj.weight)))


def mlp_forward(self: MLP, x, seq_idx=None, state=None):
    return _tp_mlp(self, x, self._lf_comm)


def moe_forward(self: LatentMoE, x, seq_idx=None, state=None):
    """Routed experts on this rank's own tokens; the shared expert tensor-parallel."""
    shape = x.shape
    routed, _, _ = self.routed(x.reshape(-1, shape[-1]))  # the balance loss comes from the runner's router hook
    return routed.view(shape) + _tp_mlp(self.shared_experts, x, self._lf_comm)


# ----- installation -------------------------------------------------------------------------------------------------
def mamba_rows(cfg, tp: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(in_proj rows, conv channels) of TP rank `rank`: its heads' z, x, dt and its groups' B, C."""
    di, gn, nh = cfg.mamba_d_inner, cfg.mamba_groups * cfg.ssm_state_size, cfg.mamba_num_heads

    def block(offset, size):
        step = size // tp
        return torch.arange(offset + rank * step, offset + (rank + 1) * step)

    in_rows = torch.cat([block(0, di), block(di, di), block(2 * di, gn), block(2 * di + gn, gn),
                         block(2 * di + 2 * gn, nh)])
    conv_rows = torch.cat([block(0, di), block(di, gn), block(di + gn, gn)])
    return in_rows, conv_rows


def parallelize_mixers(parts: list, ctx, tp_mesh, src_data_rank=0) -> None:
    """Shard the mixers' weights over `tp_mesh` (when tp > 1) and install the parallel forwards (tp or cp > 1).

    `parts`: modules to walk (model parts, or single blocks)."""
    comm = _Comm(ctx)
    tp = ctx.tp

    def _shard(module, name, mesh, dim):
        shard_parameter(module, name, mesh, dim, src_data_rank)

    for part in parts:
        for module in part.modules():
            if isinstance(module, LatentMoE):
                module.shared_experts._lf_shared_expert = True  # split with its MoE, not as a dense MLP
        for module in part.modules():
            kind = _kind(module)
            if kind is None or (tp == 1 and kind in ("mlp", "moe")) or (tp == 1 and ctx.cp == 1):
                continue
            module._lf_comm = comm
            if kind == "attention":
                if tp > 1:
                    for name in ("q_proj", "k_proj", "v_proj"):
                        _shard(getattr(module, name), "weight", tp_mesh, 0)
                    _shard(module.o_proj, "weight", tp_mesh, 1)
                module.forward = types.MethodType(attention_forward, module)
            elif kind == "mamba":
                if tp > 1:
                    in_rows, conv_rows = mamba_rows(ctx.cfg, tp, ctx.groups.tp_rank)
                    device = module.in_proj.weight.device
                    module._lf_in_rows, module._lf_conv_rows = in_rows.to(device), conv_rows.to(device)
                    _shard(module.in_proj, "weight", tp_mesh, 0)
                    _shard(module.conv1d, "weight", tp_mesh, 0)
                    _shard(module.conv1d, "bias", tp_mesh, 0)
                    for name in ("dt_bias", "A_log", "D"):
                        _shard(module, name, tp_mesh, 0)
                    _shard(module.norm, "weight", tp_mesh, 0)
                    _shard(module.out_proj, "weight", tp_mesh, 1)
                module.forward = types.MethodType(mamba_forward, module)
            elif kind == "mlp":
                _shard(module.up_proj, "weight", tp_mesh, 0)
                _shard(module.down_proj, "weight", tp_mesh, 1)
                module.forward = types.MethodType(mlp_forward, module)
            elif kind == "moe":
                _shard(module.shared_experts.up_proj, "weight", tp_mesh, 0)
                _shard(module.shared_experts.down_proj, "weight", tp_mesh, 1)
                module.forward = types.MethodType(moe_forward, module)


def _kind(module):
    if isinstance(module, Attention):
        return "attention"
    if isinstance(module, Mamba2Mixer):
        return "mamba"
    if isinstance(module, LatentMoE):
        return "moe"
    if isinstance(module, MLP) and not getattr(module, "_lf_shared_expert", False):
        return "mlp"
    return None
