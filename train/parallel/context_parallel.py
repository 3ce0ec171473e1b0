"""Context parallelism for the mixers: the `context` object a mixer's forward gets under CP (model/ contract).

Each CP rank holds chunks of the sequence (token_order.py: by default two head/tail chunks per rank). Built by
`ParallelContext.mixer_context()` from the micro-batch being run, it gives the two mixers what they cannot compute
from their own tokens:
  attention(q, k, v)         this rank's queries against the keys/values of every CP rank, block by block with an
                             online softmax, masked per block from global positions and document ids; O(s/cp) kept
                             for the backward (cp_attention.py)
  mamba_mix(mixer, xbc, dt)  the conv and the scan of this rank's chunks through the mixer's own steps
                             (`convolve`, `ssm_inputs`, `scan`): one scan per chunk from a zero state; the conv
                             history and the incoming SSM state of each chunk come from the chunk before it, the
                             state's contribution added in closed form (exact, document resets kept)

Mamba, per layer and rank, with L = s/cp local tokens, h heads of p x n state: the scan costs what a single process
spends on those L tokens; the closed-form term L*h*p*n multiply-adds (one chunk-state contraction); the
communication is an all-gather of 2cp final states (h*p*n each, fp32) and decays plus the (k-1)-token conv tails:
O(cp*h*p*n), independent of the sequence length. Megatron's CP for Mamba instead all-to-alls the whole activations
twice per layer (sequence-sharded to head-sharded and back: ~2 * (cp-1)/cp * L * (conv channels + d_inner)
elements per rank) so each rank scans the full sequence for h/cp heads, which caps CP at heads/TP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .collectives import gather_along, keep_in_graph
from .cp_attention import block_plan, context_attention

if TYPE_CHECKING:
    from latentforge.model.mamba import Mamba2Mixer

    from .collectives import Group
    from .context import MicroBatch


class ContextParallelMixing:
    """The CP ranks' chunks of the current micro-batch `mb` (context.py's MicroBatch), over `cp_group`."""

    def __init__(self, mb: MicroBatch, cp_group: Group, cp_rank: int, attention_block: int) -> None:
        self.mb, self.cp_group, self.cp_rank, self.attention_block = mb, cp_group, cp_rank, attention_block

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (b, heads, s_cp, d), k and v (b, kv_heads, s_cp, d) of this rank's tokens -> (b, heads, s_cp, d)."""
        mb = self.mb
        pos_cp, pos_all = mb.pos_cp, mb.pos_all
        assert pos_cp is not None and pos_all is not None, "ParallelContext.prepare sets them under CP"
        plan = mb.cache.get("attention_plan")  # the same for every attention layer of the micro-batch
        if plan is None:
            mb.cache["key_docs"] = key_docs = mb.seq_full[:, pos_all]
            plan = mb.cache["attention_plan"] = block_plan(pos_cp, pos_all, mb.seq_cp, key_docs, self.attention_block)
        return context_attention(q, k, v, pos_cp, pos_all, mb.seq_cp, mb.cache["key_docs"], self.cp_group, plan=plan)

    def mamba_mix(self, mixer: Mamba2Mixer, xbc: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """xbc (b, s_cp, conv channels) and raw dt (b, s_cp, heads) of this rank's tokens -> y (b, s_cp, h, p)."""
        segments = _Segments(self.mb, self.cp_group, self.cp_rank, xbc.shape[0])
        xbc, dt, seq = segments.stack(xbc), segments.stack(dt), segments.stack(self.mb.seq_cp)
        history = segments.conv_history(xbc, mixer.conv1d.weight.shape[-1])
        xbc, _ = mixer.convolve(xbc, seq, history)
        xs, B, C, dt, A = mixer.ssm_inputs(xbc, dt)
        y, final = mixer.scan(xs, dt, A, B, C, seq)
        y = y + segments.incoming_state_term(final, dt, A, C, seq).to(y.dtype)
        return segments.unstack(y)


class _Segments:
    """This CP rank's chunks of the sequence (token_order.py) as rows of one batch: (b, n*L, ...) <-> (n*b, L, ...),
    segment-major, so the conv and the scan run once over all of them."""

    def __init__(self, mb: MicroBatch, cp_group: Group, cp_rank: int, batch: int) -> None:
        assert mb.order is not None, "ParallelContext.prepare sets it under CP"
        self.order, self.cp_group, self.batch, self.seq_full = mb.order, cp_group, batch, mb.seq_full
        self.chunks = self.order.chunks_of(cp_rank)
        self.n = len(self.chunks)

    def stack(self, t: torch.Tensor) -> torch.Tensor:
        if self.n == 1:
            return t
        b, s = t.shape[:2]
        return (
            t.reshape(b, self.n, s // self.n, *t.shape[2:])
            .transpose(0, 1)
            .reshape(self.n * b, s // self.n, *t.shape[2:])
        )

    def unstack(self, t: torch.Tensor) -> torch.Tensor:
        if self.n == 1:
            return t
        rows, length = t.shape[:2]
        b = rows // self.n
        return t.reshape(self.n, b, length, *t.shape[2:]).transpose(0, 1).reshape(b, self.n * length, *t.shape[2:])

    def _rows(self, gathered: torch.Tensor, chunk: int) -> torch.Tensor:
        """Chunk `chunk`'s rows (b, ...) of a tensor all-gathered over CP from every rank's stacked rows."""
        rank, segment = self.order.owner(chunk)
        return gathered[rank, segment * self.batch : (segment + 1) * self.batch]

    def _same_doc(self, before: slice, at: int) -> torch.Tensor:
        """(b, len) whether the positions `before` are in the document of position `at`."""
        return self.seq_full[:, before] == self.seq_full[:, at : at + 1]

    def conv_history(self, xbc: torch.Tensor, kernel: int) -> torch.Tensor:
        """(n*b, c, k-1): the k-1 conv inputs before each chunk (the previous chunk's last ones, from whichever
        rank holds it), zeroed where they belong to another document than the chunk's first token."""
        keep = kernel - 1
        tails = gather_along(xbc[:, -keep:].unsqueeze(0), 0, self.cp_group)  # (cp, n*b, k-1, c)
        length = self.order.chunk_len
        histories = []
        for chunk in self.chunks:
            if chunk == 0:
                histories.append(keep_in_graph(torch.zeros_like(xbc[: self.batch, -keep:]), tails))
                continue
            start = chunk * length
            same_doc = self._same_doc(slice(start - keep, start), start)
            histories.append(self._rows(tails, chunk - 1) * same_doc.unsqueeze(-1).to(xbc.dtype))
        return torch.cat(histories).transpose(1, 2)

    def incoming_state_term(
        self, final: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, C: torch.Tensor, seq: torch.Tensor
    ) -> torch.Tensor:
        """(n*b, L, h, p): C_t . (exp(cumulative dt*A up to t) * S_in) for the tokens of each chunk's first
        document, S_in the exact SSM state entering the chunk; in the scan state's dtype (fp32, or fp64).

        S_in by the recurrence over the 2cp (cp) chunks of the sequence: S_0 = 0,
        S_{c+1} = (F_c + a_c S_c) if chunk c+1 continues chunk c's last document else 0, with F_c the zero-start
        final state of chunk c and a_c = exp(sum dt A) its total decay (0 if a document starts inside it)."""
        log_decay = torch.cumsum((dt * A).to(final.dtype), dim=1)  # (n*b, L, h), fp32 (fp64 for fp64 inputs)
        one_doc = (seq[:, 0] == seq[:, -1]).to(log_decay.dtype)
        decay = torch.exp(log_decay[:, -1]) * one_doc[:, None]
        finals = gather_along(final.unsqueeze(0), 0, self.cp_group)  # (cp, n*b, h, p, n)
        decays = gather_along(decay.unsqueeze(0), 0, self.cp_group)  # (cp, n*b, h)
        incoming = self._incoming_states(finals, decays)
        incoming = keep_in_graph(keep_in_graph(incoming, finals), decays)  # every rank reaches the backward
        rows, _, heads = dt.shape
        groups, state = C.shape[2], C.shape[3]
        grouped = incoming.view(rows, groups, heads // groups, -1, state)  # head h = group * (h/g) + i
        term = torch.einsum("blgn,bgrpn->blgrp", C.to(final.dtype), grouped).reshape(rows, -1, heads, grouped.shape[3])
        first_doc = (seq == seq[:, :1]).to(term.dtype)  # documents are contiguous: the row's first one
        return term * (torch.exp(log_decay) * first_doc[..., None])[..., None]

    def _incoming_states(self, finals: torch.Tensor, decays: torch.Tensor) -> torch.Tensor:
        length = self.order.chunk_len
        state = torch.zeros_like(finals[0, : self.batch])
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
