"""Tensor/sequence- and context-parallel forwards of the mixers, and the sharding of their weights.

Between blocks every rank holds its own slice of the sequence (b, s / (cp * tp), H): the context-parallel chunk,
then the sequence-parallel piece of it. A tensor-parallel mixer all-gathers the pieces of its CP chunk over the TP
group, runs its share of heads (column-parallel projections), and reduce-scatters the row-parallel output back to
pieces (Megatron's sequence parallelism). Context parallelism (each CP rank holds two head/tail chunks of the
sequence by default, token_order.py) then adds, per mixer kind:
  attention  blockwise attention with an online softmax over every CP rank's keys/values, masked per block from
             global positions and document ids; O(s/cp) kept for the backward (cp_attention.py);
  Mamba      one scan per chunk from a zero state; the conv history and the incoming SSM state of each chunk
             come from the chunk before it, the state's contribution added in closed form (exact, resets kept).
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
from latentforge.model.attention import Attention
from latentforge.model.mamba import Mamba2Mixer
from latentforge.model.mlp import MLP, squared_relu
from latentforge.model.moe import LatentMoE

from .collectives import gather_along, keep_in_graph, scatter_along
from .cp_attention import block_plan, context_attention


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
def attention_forward(self: Attention, x, seq_idx=None, state=None, context=None):
    """This rank's queries against the keys/values of every CP rank, block by block (cp_attention.py)."""
    comm: _Comm = self._lf_comm
    mb = comm.ctx.current
    xg = comm.gather_tp(x)  # (b, s_cp, H): this CP rank's tokens
    b, s, _ = xg.shape
    d = self.head_dim
    q = call_linear(self.q_proj, xg, local(self.q_proj.weight)).view(b, s, -1, d).transpose(1, 2)
    k = call_linear(self.k_proj, xg, local(self.k_proj.weight)).view(b, s, -1, d).transpose(1, 2)
    v = call_linear(self.v_proj, xg, local(self.v_proj.weight)).view(b, s, -1, d).transpose(1, 2)
    plan = mb.cache.get("attention_plan")
    if plan is None:
        plan = mb.cache["attention_plan"] = block_plan(mb.pos_cp, mb.pos_all, comm.ctx.attention_block)
        mb.cache["key_docs"] = mb.seq_full[:, mb.pos_all]
    out = context_attention(q, k, v, mb.pos_cp, mb.pos_all, mb.seq_cp, mb.cache["key_docs"], comm.cp_group,
                            plan=plan)
    out = call_linear(self.o_proj, out.transpose(1, 2).reshape(b, s, -1), local(self.o_proj.weight))
    return comm.scatter_tp(out)


# ----- Mamba -----------------------------------------------------------------------------------------------------
def mamba_forward(self: Mamba2Mixer, x, seq_idx=None, state=None, context=None):
    """One scan per layer under CP: each of this rank's chunks is scanned from a zero state, then the state that
    enters it (from the final states and decays of every chunk, all-gathered) is added in closed form.

    Per layer and rank, with L = s/cp local tokens, h heads of p x n state: the scan costs what a single process
    spends on those L tokens; the closed-form term L*h*p*n multiply-adds (one chunk-state contraction); the
    communication is an all-gather of 2cp final states (h*p*n each, fp32) and decays plus the (k-1)-token conv
    tails: O(cp*h*p*n), independent of the sequence length. Megatron's CP for Mamba instead all-to-alls the whole
    activations twice per layer (sequence-sharded to head-sharded and back: ~2 * (cp-1)/cp * L * (conv channels +
    d_inner) elements per rank) so each rank scans the full sequence for h/cp heads, which caps CP at heads/TP.
    """
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
    segments = _Segments(mb, comm, b)
    xbc, seq = segments.stack(xbc), segments.stack(mb.seq_cp)
    conv_history = segments.conv_history(xbc, conv_w.shape[-1]) if comm.cp > 1 else None
    xbc, _ = causal_conv1d(xbc, conv_w.squeeze(1), conv_b, seq_idx=seq, initial_state=conv_history,
                           activation="silu")
    xs, B, C = xbc.split([d_inner, bc_size, bc_size], dim=-1)
    groups = bc_size // self.state_size
    dt = F.softplus(segments.stack(dt).float() + dt_bias.float())
    A = -torch.exp(A_log.float())
    rows = xs.shape[0]
    xs = xs.reshape(rows, -1, heads, self.head_dim)
    B = B.reshape(rows, -1, groups, self.state_size)
    C = C.reshape(rows, -1, groups, self.state_size)
    y, final = ssd_scan(xs, dt, A, B, C, D=D, chunk_size=self.chunk_size, seq_idx=seq)
    if comm.cp > 1:
        y = y + segments.incoming_state_term(final, dt, A, C, seq).to(y.dtype)
    y = segments.unstack(y.reshape(rows, -1, d_inner))
    y = gated_rms_norm(y, z, local(self.norm.weight), self.norm.group_size, self.norm.eps)
    out = call_linear(self.out_proj, y, local(self.out_proj.weight))
    return comm.scatter_tp(out)


class _Segments:
    """This CP rank's chunks of the sequence (token_order.py) as rows of one batch: (b, n*L, ...) <-> (n*b, L, ...),
    segment-major, so the conv and the scan run once over all of them."""

    def __init__(self, mb, comm: _Comm, batch: int):
        self.order, self.comm, self.batch, self.seq_full = mb.order, comm, batch, mb.seq_full
        self.chunks = self.order.chunks_of(comm.cp_rank) if comm.cp > 1 else [0]
        self.n = len(self.chunks)

    def stack(self, t: torch.Tensor) -> torch.Tensor:
        if self.n == 1:
            return t
        b, s = t.shape[:2]
        return t.reshape(b, self.n, s // self.n, *t.shape[2:]).transpose(0, 1).reshape(self.n * b, s // self.n,
                                                                                         *t.shape[2:])

    def unstack(self, t: torch.Tensor) -> torch.Tensor:
        if self.n == 1:
            return t
        rows, length = t.shape[:2]
        b = rows // self.n
        return t.reshape(self.n, b, length, *t.shape[2:]).transpose(0, 1).reshape(b, self.n * length, *t.shape[2:])

    def _rows(self, gathered: torch.Tensor, chunk: int) -> torch.Tensor:
        """Chunk `chunk`'s rows (b, ...) of a tensor all-gathered over CP from every rank's stacked rows."""
        rank, segment = self.order.owner(chunk)
        return gathered[rank, segment * self.batch:(segment + 1) * self.batch]

    def _same_doc(self, before: slice, at: int) -> torch.Tensor:
        """(b, len) whether the positions `before` are in the document of position `at`."""
        return self.seq_full[:, before] == self.seq_full[:, at:at + 1]

    def conv_history(self, xbc: torch.Tensor, kernel: int) -> torch.Tensor:
        """(n*b, c, k-1): the k-1 conv inputs before each chunk (the previous chunk's last ones, from whichever
        rank holds it), zeroed where they belong to another document than the chunk's first token."""
        keep = kernel - 1
        tails = gather_along(xbc[:, -keep:].unsqueeze(0), 0, self.comm.cp_group)  # (cp, n*b, k-1, c)
        length = self.order.chunk_len
        histories = []
        for chunk in self.chunks:
            if chunk == 0:
                histories.append(keep_in_graph(torch.zeros_like(xbc[:self.batch, -keep:]), tails))
                continue
            start = chunk * length
            same_doc = self._same_doc(slice(start - keep, start), start)
            histories.append(self._rows(tails, chunk - 1) * same_doc.unsqueeze(-1).to(xbc.dtype))
        return torch.cat(histories).transpose(1, 2)

    def incoming_state_term(self, final, dt, A, C, seq) -> torch.Tensor:
        """(n*b, L, h, p): C_t . (exp(cumulative dt*A up to t) * S_in) for the tokens of each chunk's first
        document, S_in the exact SSM state entering the chunk; in the scan state's dtype (fp32, or fp64).

        S_in by the recurrence over the 2cp (cp) chunks of the sequence: S_0 = 0,
        S_{c+1} = (F_c + a_c S_c) if chunk c+1 continues chunk c's last document else 0, with F_c the zero-start
        final state of chunk c and a_c = exp(sum dt A) its total decay (0 if a document starts inside it)."""
        log_decay = torch.cumsum((dt * A).to(final.dtype), dim=1)  # (n*b, L, h), fp32 (fp64 for fp64 inputs)
        one_doc = (seq[:, 0] == seq[:, -1]).to(log_decay.dtype)
        decay = torch.exp(log_decay[:, -1]) * one_doc[:, None]
        finals = gather_along(final.unsqueeze(0), 0, self.comm.cp_group)  # (cp, n*b, h, p, n)
        decays = gather_along(decay.unsqueeze(0), 0, self.comm.cp_group)  # (cp, n*b, h)
        incoming = self._incoming_states(finals, decays)
        incoming = keep_in_graph(keep_in_graph(incoming, finals), decays)  # every rank reaches the backward
        rows, _, heads = dt.shape
        groups, state = C.shape[2], C.shape[3]
        grouped = incoming.view(rows, groups, heads // groups, -1, state)  # head h = group * (h/g) + i
        term = torch.einsum("blgn,bgrpn->blgrp", C.to(final.dtype), grouped).reshape(rows, -1, heads, grouped.shape[3])
        first_doc = (seq == seq[:, :1]).to(term.dtype)  # documents are contiguous: the row's first one
        return term * (torch.exp(log_decay) * first_doc[..., None])[..., None]

    def _incoming_states(self, finals, decays) -> torch.Tensor:
        length = self.order.chunk_len
        state = torch.zeros_like(finals[0, :self.batch])
        entering = {}
        for chunk in range(max(self.chunks) + 1):
            entering[chunk] = state
            end = (chunk + 1) * length
            if end >= self.order.seq_len:
                break
            state = self._rows(finals, chunk) + self._rows(decays, chunk)[..., None, None] * state
            continues = self._same_doc(slice(end - 1, end), end)[:, 0]
            state = state * continues.to(state.dtype)[:, None, None, None]
        return torch.cat([entering[chunk] for chunk in self.chunks])


# ----- MLP and MoE -------------------------------------------------------------------------------------------------
def _tp_mlp(mlp: MLP, x, comm: _Comm):
    """Column-parallel up, row-parallel down, on the gathered CP chunk; returns this rank's sequence piece."""
    xg = comm.gather_tp(x)
    h = squared_relu(call_linear(mlp.up_proj, xg, local(mlp.up_proj.weight)))
    return comm.scatter_tp(call_linear(mlp.down_proj, h, local(mlp.down_proj.weight)))


def mlp_forward(self: MLP, x, seq_idx=None, state=None, context=None):
    return _tp_mlp(self, x, self._lf_comm)


def moe_forward(self: LatentMoE, x, seq_idx=None, state=None, context=None, forced_topk=None):
    """Routed experts on this rank's own tokens (`forced_topk`: replayed experts); the shared expert
    tensor-parallel."""
    shape = x.shape
    routed, _, _ = self.routed(x.reshape(-1, shape[-1]), forced_topk)  # the balance loss comes from the runner's router hook
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
