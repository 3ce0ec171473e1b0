"""The training losses, computed outside the model from what its forward returns (as TorchTitan does): the LM loss,
the MTP losses (one MTP recursion, `model.mtp.mtp_recursion`) and the MoE sequence-level balance loss, with the
expert loads. Pretraining and SFT (the parallel runner), GRPO's MTP term and the tests all use these functions.

Every term is a *partial sum* normalised by a *global* count, so that summing the partial losses of all pieces
(data-parallel ranks: different sequences; context- and sequence-parallel ranks: different pieces of a sequence;
pipeline stages: different layers; micro-batches) gives exactly the loss of the whole global batch:

    loss = sum_tokens CE / N_lm + (w / D) sum_k sum_tokens CE_k / N_k + coeff * sum_layers sum_seqs aux / N_seq

with N_lm, N_k the target tokens (labels != -100) of the main and k-th MTP head and N_seq the sequences, over the
global batch (`Normalizers`). Gradients then only need *summing* over ranks, never averaging. On one process with
one batch the counts are the batch's own (`model_loss`).

The sequence-level balance loss of a MoE layer, per sequence, is sum_e f_e P_e with f_e = E/(k T) * (tokens routed
to e) and P_e = mean over tokens of the normalised score (DeepSeek-V3). f is a count over the *whole* sequence
(summed over the ranks holding its pieces, no gradient); P is linear in the tokens, so each piece adds
f_e * (its tokens' score sum) / T. An `attention_mask` (0 = padding) keeps padded positions out of f, P, T, the
expert loads and the sequence count, so padding (which differs between layouts) never changes the step. The MTP
block's MoE layer counts once per depth (its load row sums the depths).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from latentforge.kernels.cross_entropy import linear_cross_entropy
from latentforge.model.config import ModelConfig
from latentforge.model.hybrid import IGNORE_INDEX, HybridModel
from latentforge.model.mixer_types import MixerContext
from latentforge.model.moe import Routing
from latentforge.model.mtp import MTPBlock, mtp_recursion, shift_left


@dataclass
class Normalizers:
    """The global batch's counts that every partial loss is divided by."""

    lm: float  # target tokens of the main head (at least 1: a divisor)
    mtp: list[float]  # target tokens of each MTP depth (at least 1 each)
    sequences: float  # sequences with at least one real token (at least 1)
    targets: int = 0  # the actual number of target tokens

    @classmethod
    def of_batch(
        cls, labels: torch.Tensor, mtp_depths: int, attention_mask: Optional[torch.Tensor] = None
    ) -> Normalizers:
        """The counts of one whole (b, s) batch (one process, one micro-batch)."""
        targets = int((labels != IGNORE_INDEX).sum())
        mtp = [float((shifted_labels(labels, k) != IGNORE_INDEX).sum()) for k in range(1, mtp_depths + 1)]
        rows = labels.shape[0] if attention_mask is None else int((attention_mask.sum(1) > 0).sum())
        return cls(
            lm=max(float(targets), 1.0),
            mtp=[max(n, 1.0) for n in mtp],
            sequences=max(float(rows), 1.0),
            targets=targets,
        )


def shifted_labels(labels: torch.Tensor, depth: int) -> torch.Tensor:
    """MTP depth `depth`'s targets: position t predicts token t + depth + 1 (labels shifted left by depth)."""
    return shift_left(labels, depth, IGNORE_INDEX)


def ce_sum(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of lm_head(hidden) over the target tokens (fused: the logits never exist whole)."""
    return linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head_weight,
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@dataclass
class TokenPiece:
    """The tokens a forward saw, as the balance loss needs them: `batch` rows of this piece of sequences of length
    `seq_len`; `real` (b, s_local) marks real tokens (None: all), `row_tokens` (b,) each whole row's real tokens;
    `seq_group` the process group holding the other pieces of the same sequences (None: the piece is whole)."""

    batch: int
    seq_len: int
    real: Optional[torch.Tensor] = None
    row_tokens: Optional[torch.Tensor] = None
    seq_group: Optional[dist.ProcessGroup] = None


def balance_partial(routing: Routing, piece: TokenPiece) -> torch.Tensor:
    """Sum over this piece's sequences of sum_e f_e P_e, with this piece's tokens' share of P (module doc)."""
    scores, topk_idx = routing.scores, routing.topk_idx
    tokens, top_k = topk_idx.shape
    experts = scores.shape[-1]
    batch = piece.batch
    local = tokens // batch
    if piece.real is None:
        weight, T = 1.0, float(piece.seq_len)
    else:
        if piece.row_tokens is None:
            raise ValueError("a TokenPiece with real (b, s_local) needs row_tokens (b,): each row's real tokens")
        weight = piece.real.reshape(batch, local, 1).to(scores.dtype)
        T = piece.row_tokens.to(scores.dtype).clamp(min=1).view(batch, 1)
    with torch.no_grad():
        chosen = torch.zeros(batch, local, experts, device=scores.device, dtype=scores.dtype)
        chosen.scatter_(-1, topk_idx.view(batch, local, top_k), 1.0)
        counts = (chosen * weight).sum(1)
        if piece.seq_group is not None:
            from latentforge.train.parallel.collectives import all_reduce_sum

            counts = all_reduce_sum(counts, piece.seq_group)
        f = counts * (experts / top_k) / T
    p = ((scores / scores.sum(-1, keepdim=True)).view(batch, local, experts) * weight).sum(1) / T
    return (f * p).sum()


def expert_load(routing: Routing, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(E,) float64: how many (real) tokens chose each expert."""
    topk_idx = routing.topk_idx if real is None else routing.topk_idx[real.reshape(-1)]
    return torch.bincount(topk_idx.flatten(), minlength=routing.scores.shape[-1]).to(torch.float64)


@dataclass
class Balance:
    """The balance loss of some MoE routings (unweighted, / N_seq) and their expert loads by row."""

    loss: Optional[torch.Tensor] = None
    loads: dict[int, torch.Tensor] = field(default_factory=dict)  # expert-load row -> (E,) float64


def balance(routings: Sequence[tuple[int, Routing]], piece: TokenPiece, norms: Normalizers) -> Balance:
    """`routings`: (expert-load row, Routing) pairs (trunk MoE index, or the MTP row once per depth)."""
    out = Balance()
    for row, routing in routings:
        load = expert_load(routing, piece.real)
        out.loads[row] = out.loads[row] + load if row in out.loads else load
        partial = balance_partial(routing, piece) / norms.sequences
        out.loss = partial if out.loss is None else out.loss + partial
    return out


@dataclass
class HeadLosses:
    """The LM and MTP partial losses of the last stage (each / its global count), and the MTP block's routings."""

    lm: torch.Tensor
    mtp: list[torch.Tensor] = field(default_factory=list)
    mtp_routings: list[Routing] = field(default_factory=list)  # one Routing per depth

    def weighted(self, cfg: ModelConfig) -> torch.Tensor:
        loss = self.lm
        if self.mtp:
            loss = loss + cfg.mtp_loss_weight / len(self.mtp) * sum(self.mtp)
        return loss


def head_losses(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    norms: Normalizers,
    *,
    mtp: Optional[MTPBlock] = None,
    mtp_embeddings: Sequence[torch.Tensor] = (),
    mtp_labels: Sequence[torch.Tensor] = (),
    seq_idx: Optional[torch.Tensor] = None,
    context: Optional[MixerContext] = None,
) -> HeadLosses:
    """LM loss of the final-normed `hidden`, and with an MTP block each depth's loss (`mtp_embeddings[k-1]` /
    `mtp_labels[k-1]`: inputs / labels shifted left by k on the whole sequence, then sliced like hidden)."""
    out = HeadLosses(lm=ce_sum(hidden, head_weight, labels) / norms.lm)
    if mtp is None:
        return out
    depths = mtp_recursion(mtp, mtp_embeddings, hidden, seq_idx=seq_idx, context=context)
    for k, ((depth_hidden, routing), depth_labels) in enumerate(zip(depths, mtp_labels)):
        out.mtp.append(ce_sum(depth_hidden, head_weight, depth_labels) / norms.mtp[k])
        out.mtp_routings.append(routing)
    return out


@dataclass
class LossOutput:
    """A whole model's training loss on one batch (`model_loss`)."""

    loss: torch.Tensor  # lm + MTP (weighted) + balance (weighted)
    lm_loss: torch.Tensor
    mtp_losses: list[torch.Tensor]  # one CE per depth, unweighted
    aux_loss: Optional[torch.Tensor]  # sum over MoE layers (and MTP depths), unweighted
    expert_load: Optional[torch.Tensor]  # (MoE layers, E) long: tokens per expert (HybridModel.moe_rows order)
    hidden: torch.Tensor


def model_loss(
    model: HybridModel,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    seq_idx: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    routes: Optional[torch.Tensor] = None,
) -> LossOutput:
    """The training loss of a whole (unsplit) model on one batch, normalised by the batch's own counts: what the
    parallel runner computes for the same global batch under any layout."""
    cfg = model.cfg
    norms = Normalizers.of_batch(labels, cfg.mtp_depths, attention_mask)
    out = model(input_ids, seq_idx=seq_idx, routes=routes, with_logits=False)
    real = None if attention_mask is None else attention_mask.bool()
    piece = TokenPiece(
        batch=input_ids.shape[0],
        seq_len=input_ids.shape[1],
        real=real,
        row_tokens=None if real is None else real.sum(1),
    )
    heads = head_losses(
        out.hidden,
        model.lm_head.weight,
        labels,
        norms,
        mtp=model.mtp,
        mtp_embeddings=model.mtp_embeddings(input_ids) if model.mtp is not None else (),
        mtp_labels=[shifted_labels(labels, k) for k in range(1, cfg.mtp_depths + 1)],
        seq_idx=seq_idx,
    )
    mtp_row = len(model.trunk_moe_index)
    routings = sorted(out.routing.items()) + [(mtp_row, r) for r in heads.mtp_routings]
    moe = balance(routings, piece, norms)
    loss = heads.weighted(cfg)
    if moe.loss is not None:
        loss = loss + cfg.moe_aux_loss_coeff * moe.loss
    load = torch.stack([moe.loads[r] for r in sorted(moe.loads)]).round().long() if moe.loads else None
    return LossOutput(
        loss=loss, lm_loss=heads.lm, mtp_losses=heads.mtp, aux_loss=moe.loss, expert_load=load, hidden=out.hidden
    )
