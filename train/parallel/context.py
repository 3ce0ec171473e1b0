"""What one optimizer step's micro-batches look like on this rank, and the losses computed from its pieces.

Every loss term is a *partial sum* normalised by a *global* count, so that summing the partial losses of all ranks
(data-parallel ranks: different sequences; context- and sequence-parallel ranks: different pieces of a sequence;
pipeline stages: different layers) gives exactly the single-process loss of the whole global batch:

    loss = sum_tokens CE / N_lm + (w / D) sum_k sum_tokens CE_k / N_k + coeff * sum_layers sum_seqs aux / N_seq

with N_lm, N_k the target tokens (labels != -100) of the main and k-th MTP head and N_seq the sequences, over the
global batch. Gradients then only need *summing* over ranks (FSDP with divide factor 1, all-to-all backward,
tensor-parallel all-reduce), never averaging.

The sequence-level balance loss of a MoE layer, per sequence, is sum_e f_e P_e with f_e = E/(k T) * (tokens routed
to e) and P_e = mean over tokens of the normalised score. f is a count over the *whole* sequence (summed over the
ranks holding its pieces, no gradient); P is linear in the tokens, so each rank adds f_e * (its tokens' score sum)/T.
A micro-batch's optional `attention_mask` (b, s; 0 = padding) keeps padded positions out of f, P, T, the expert
loads and the sequence count, so padding (which differs between layouts) never changes the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from latentforge.kernels.cross_entropy import linear_cross_entropy
from latentforge.model.hybrid import IGNORE_INDEX
from latentforge.model.mtp import shift_left

from .collectives import all_reduce_sum
from .token_order import TokenOrder


@dataclass
class MicroBatch:
    """One micro-batch as this rank sees it: `*_local` are this rank's tokens of the sequence (CP then TP), in the
    CP token order (token_order.py: under CP, by default two head/tail chunks per rank, not one contiguous piece)."""

    batch: int
    seq_len: int
    ids_local: torch.Tensor
    labels_local: torch.Tensor
    seq_local: torch.Tensor  # document ids of the local slice
    seq_cp: torch.Tensor  # document ids of this CP rank's tokens (what a tensor-parallel mixer sees)
    seq_full: torch.Tensor  # document ids of the whole sequence (context-parallel masks and states)
    order: Optional[TokenOrder] = None  # which tokens each CP rank holds (token_order.py)
    pos_cp: Optional[torch.Tensor] = None  # (s / cp,) global positions of this CP rank's tokens
    pos_all: Optional[torch.Tensor] = None  # (s,) global positions of every CP rank's tokens, in rank order
    cache: dict = field(default_factory=dict)  # per-micro-batch values the mixers derive once (block plans)
    mtp_ids_local: list = field(default_factory=list)  # shifted inputs per MTP depth (local slice)
    mtp_labels_local: list = field(default_factory=list)
    extras: dict = field(default_factory=dict)  # the caller's other keys: (b, s, ...) tensors sliced, rest as-is
    real_local: Optional[torch.Tensor] = None  # (b, s_local) bool: real tokens (attention_mask), None: all real
    row_tokens: Optional[torch.Tensor] = None  # (b,) real tokens of each whole row (the balance loss's T)


@dataclass
class TrunkOutput:
    """What a loss hook gets from the last stage, for this rank's token slice (CP chunk, then TP piece).

    `mtp_embeddings[k-1]` is the embedding of input_ids shifted left by k (computed on the first stage, where the
    embedding lives) and `mtp_labels[k-1]` the labels shifted left by k (shifted on the full sequence, then
    sliced): with `part.mtp` they rebuild the MTP recursion of HybridModel (detach the inputs to train the MTP
    block alone). Every rank must call `part.mtp` equally often (its layers hold collectives)."""

    hidden: torch.Tensor  # (b, s_local, H), after norm_f
    lm_head_weight: torch.Tensor  # (V, H), the full weight (tensor parallelism never splits lm_head)
    part: object  # this stage's model part (part.mtp, part.lm_head)
    mtp_embeddings: list
    mtp_labels: list
    seq_idx: torch.Tensor  # (b, s_local) document ids


@dataclass
class Counts:
    lm: float  # target tokens of the main head (at least 1: a divisor)
    mtp: list
    sequences: float
    targets: int = 0  # the actual number of target tokens


class ParallelContext:
    """Shared by the stage modules, the parallel mixers and the router hooks of one runner."""

    def __init__(self, groups, model_cfg, device, load_balance: bool = True, attention_block: int = 1024):
        self.groups = groups
        self.load_balance = load_balance  # the zigzag token order under CP (token_order.py)
        self.attention_block = attention_block
        self.cfg = model_cfg
        self.device = device
        lay = groups.layout
        self.cp, self.tp = lay.cp, lay.tp
        self.micro_batches: list = []
        self.counts: Optional[Counts] = None
        self.current: Optional[MicroBatch] = None
        self.recording = False  # router hooks record only during a real forward (not an AC recompute)
        self.routes: list = []  # (moe index, scores, topk_idx) of the stage forward in progress
        self.num_moe = 0
        self.loss_fn = None  # the caller's loss hook for the step in progress (None: LM/MTP head losses)
        self.reset_step()

    # ----- per step ------------------------------------------------------------------------------------------
    def reset_step(self):
        depths = self.cfg.mtp_depths
        self.stat_lm = torch.zeros((), dtype=torch.float64, device=self.device)
        self.stat_mtp = torch.zeros(depths, dtype=torch.float64, device=self.device)
        self.stat_aux = torch.zeros((), dtype=torch.float64, device=self.device)  # unweighted, / N_seq
        self.load = torch.zeros(max(self.num_moe, 1), self.cfg.num_experts, dtype=torch.float64, device=self.device)
        self.stat_custom = torch.zeros((), dtype=torch.float64, device=self.device)  # sum of the hook's losses
        self.custom_stats: dict = {}  # the hook's statistics: summed (keys ending in _max: maximum)

    def prepare(self, micro_batches: list, labels_required: bool = True) -> None:
        """Slice every micro-batch for this rank and count the global batch's targets (summed over DP ranks).

        Keys other than input_ids / labels / seq_idx go to `extras`: tensors shaped (b, s, ...) like input_ids are
        sliced like it, anything else passes unchanged. Without `labels_required` (a loss hook) labels may be
        absent (nothing is a target)."""
        if not micro_batches:
            raise ValueError("forward_backward got no micro-batches")
        self.reset_step()
        depths = self.cfg.mtp_depths
        # [lm targets, sequences, mtp targets per depth, micro-batches, micro-batches^2, 1]
        counts = torch.zeros(5 + depths, dtype=torch.float64, device=self.device)
        n = len(micro_batches)
        counts[2 + depths:] = torch.tensor([n, n * n, 1], dtype=torch.float64)
        prepared = []
        for mb in micro_batches:
            ids, labels, seq_idx = _unpack(mb, self.device, labels_required)
            b, s = ids.shape
            order = self.token_order(s)
            local = self.local_index(s, order)
            pos_cp = order.positions(self.groups.cp_rank, self.device)
            real = _attention_mask(mb, ids)
            counts[0] += (labels != IGNORE_INDEX).sum()
            counts[1] += b if real is None else (real.sum(1) > 0).sum()  # an all-padding row is no sequence
            item = MicroBatch(batch=b, seq_len=s, ids_local=ids[:, local], labels_local=labels[:, local],
                              seq_local=seq_idx[:, local], seq_cp=seq_idx[:, pos_cp], seq_full=seq_idx,
                              order=order, pos_cp=pos_cp, pos_all=order.all_positions(self.device),
                              extras=_local_extras(mb, b, s, local, self.device))
            if real is not None:
                item.real_local, item.row_tokens = real[:, local], real.sum(1)
            for k in range(1, depths + 1):
                shifted_labels = shift_left(labels, k, IGNORE_INDEX)
                counts[1 + k] += (shifted_labels != IGNORE_INDEX).sum()
                item.mtp_ids_local.append(shift_left(ids, k, 0)[:, local])
                item.mtp_labels_local.append(shifted_labels[:, local])
            prepared.append(item)
        all_reduce_sum(counts, self.groups.dp_group)
        values = counts.tolist()
        total, squares, ranks = values[2 + depths:]
        if squares * ranks != total * total:  # not every data-parallel rank has the same number of micro-batches
            from .config import LayoutError

            raise LayoutError(f"forward_backward: the data-parallel ranks got different numbers of micro-batches "
                              f"(this rank {n}, {total:g} over {ranks:g} ranks); every rank must run the same "
                              "number per step (their collectives pair up)")
        self.micro_batches = prepared
        self.counts = Counts(lm=max(values[0], 1.0), sequences=max(values[1], 1.0),
                             mtp=[max(v, 1.0) for v in values[2:2 + depths]], targets=int(values[0]))

    def token_order(self, seq_len: int) -> TokenOrder:
        # the conv history of a chunk comes from the chunk before it only
        return TokenOrder.choose(seq_len, self.cp, self.load_balance, min_chunk=self.cfg.conv_kernel - 1)

    def local_index(self, seq_len: int, order: Optional[TokenOrder] = None) -> torch.Tensor:
        """Global positions of this rank's tokens: its CP tokens (token_order.py), then the TP (sequence-parallel)
        piece of them."""
        pieces = self.cp * self.tp
        if seq_len % pieces:
            from .config import LayoutError

            raise LayoutError(f"sequence length {seq_len} must be divisible by cp ({self.cp}) x tp ({self.tp}) = "
                              f"{pieces}; change the sequence length")
        order = order or self.token_order(seq_len)
        size = seq_len // pieces
        start = self.groups.tp_rank * size
        return order.positions(self.groups.cp_rank, self.device)[start:start + size]

    def begin(self, index: int) -> MicroBatch:
        self.current = self.micro_batches[index]
        self.routes = []
        self.recording = True
        return self.current

    def end(self):
        self.recording = False

    # ----- MoE routing -----------------------------------------------------------------------------------------
    def router_hook(self, module, inputs, outputs):
        if self.recording:
            scores, topk_idx, _ = outputs
            self.routes.append((module._lf_moe_index, scores, topk_idx))

    def routed_aux(self) -> torch.Tensor:
        """The balance-loss partial of the routes recorded in this stage forward (already / N_seq); records loads."""
        total = None
        mb = self.current
        for index, scores, topk_idx in self.routes:
            E = scores.shape[-1]
            routed = topk_idx if mb.real_local is None else topk_idx[mb.real_local.reshape(-1)]
            self.load[index] += torch.bincount(routed.flatten(), minlength=E).to(self.load.dtype)
            partial = sequence_aux_partial(scores, topk_idx, mb.batch, mb.seq_len, self.groups.seq_group,
                                           mb.real_local, mb.row_tokens)
            total = partial if total is None else total + partial
        self.routes = []
        if total is None:
            return None
        total = total / self.counts.sequences
        self.stat_aux += total.detach().double()
        return total

    # ----- heads -----------------------------------------------------------------------------------------------
    def head_losses(self, part, hidden, mtp_embeddings) -> torch.Tensor:
        """LM and MTP partial losses of the last stage (normalised by the global counts); records statistics."""
        mb = self.current
        weight = part.lm_head.weight
        lm = _ce_sum(hidden, weight, mb.labels_local) / self.counts.lm
        self.stat_lm += lm.detach().double()
        loss = lm
        depths = self.cfg.mtp_depths
        if depths:
            previous = hidden
            mtp_total = 0.0
            for k in range(1, depths + 1):
                previous = part.mtp(mtp_embeddings[k - 1], previous, seq_idx=mb.seq_local)
                term = _ce_sum(previous, weight, mb.mtp_labels_local[k - 1]) / self.counts.mtp[k - 1]
                self.stat_mtp[k - 1] += term.detach().double()
                mtp_total = mtp_total + term
            loss = loss + self.cfg.mtp_loss_weight / depths * mtp_total
        return loss

    def custom_loss(self, part, hidden, mtp_embeddings) -> torch.Tensor:
        """The caller's loss hook on the last stage (instead of head_losses); records its loss and statistics."""
        mb = self.current
        output = TrunkOutput(hidden=hidden, lm_head_weight=part.lm_head.weight, part=part,
                             mtp_embeddings=list(mtp_embeddings), mtp_labels=list(mb.mtp_labels_local),
                             seq_idx=mb.seq_local)
        local = {"input_ids": mb.ids_local, "labels": mb.labels_local, "seq_idx": mb.seq_local, **mb.extras}
        returned = self.loss_fn(output, local)
        if not (isinstance(returned, tuple) and len(returned) == 2 and isinstance(returned[1], dict)):
            raise TypeError("loss_fn must return (loss, stats): a 0-dim tensor and a dict of 0-dim tensors, got "
                            f"{type(returned).__name__}")
        loss, stats = returned
        if not torch.is_tensor(loss) or loss.numel() != 1:
            raise TypeError(f"loss_fn's loss must be a one-element tensor, got {loss!r:.80}")
        loss = loss.reshape(()).to(torch.promote_types(hidden.dtype, torch.float32))
        if torch.is_grad_enabled() and not loss.requires_grad:
            # a loss without a graph (e.g. nothing to learn in this micro-batch) still runs the backward, whose
            # collectives (FSDP, tensor parallel) every rank must reach
            loss = loss + 0.0 * hidden.sum()
        self.stat_custom += loss.detach().double()
        for key, value in stats.items():
            value = torch.as_tensor(value).detach().to(device=self.device, dtype=torch.float64)
            if value.numel() != 1:
                raise ValueError(f"loss_fn stat {key!r} must be a single number, got shape {tuple(value.shape)}")
            value = value.reshape(())
            old = self.custom_stats.get(key)
            if old is None:
                self.custom_stats[key] = value.clone()
            else:
                self.custom_stats[key] = torch.maximum(old, value) if key.endswith("_max") else old + value
        return loss

    def aux_weight(self) -> float:
        return self.cfg.moe_aux_loss_coeff


def _ce_sum(hidden, weight, labels):
    return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), weight, labels.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")


def sequence_aux_partial(scores, topk_idx, batch: int, seq_len: int, seq_group, real=None,
                         row_tokens=None) -> torch.Tensor:
    """sum over this rank's sequences of sum_e f_e P_e, with this rank's tokens' share of P (see module doc).

    scores (b * s_local, E) fp32; topk_idx (b * s_local, k); f uses the counts summed over `seq_group`. With
    `real` (b, s_local) and `row_tokens` (b,), padding positions count nowhere and T is each row's real length."""
    tokens, top_k = topk_idx.shape
    E = scores.shape[-1]
    local = tokens // batch
    if real is None:
        weight, T = 1.0, float(seq_len)
    else:
        weight = real.view(batch, local, 1).to(scores.dtype)
        T = row_tokens.to(scores.dtype).clamp(min=1).view(batch, 1)
    with torch.no_grad():
        chosen = torch.zeros(batch, local, E, device=scores.device, dtype=scores.dtype)
        chosen.scatter_(-1, topk_idx.view(batch, local, top_k), 1.0)
        f = all_reduce_sum((chosen * weight).sum(1), seq_group) * (E / top_k) / T
    p = ((scores / scores.sum(-1, keepdim=True)).view(batch, local, E) * weight).sum(1) / T
    return (f * p).sum()


def _attention_mask(mb: dict, ids: torch.Tensor):
    """The micro-batch's `attention_mask` (b, s; 1 = real token, 0 = padding) as bool on ids' device, or None.
    Padding is left out of the MoE balance loss and the expert loads (the sequence count too, for empty rows)."""
    mask = mb.get("attention_mask")
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"attention_mask {tuple(mask.shape)} must have input_ids' shape {tuple(ids.shape)}")
    return mask.to(ids.device).bool()


def _unpack(mb: dict, device, labels_required: bool = True):
    if not isinstance(mb, dict):
        raise TypeError(f"a micro-batch must be a dict of tensors (data/ batches), got {type(mb).__name__}")
    if "input_ids" not in mb or (labels_required and "labels" not in mb):
        missing = [k for k in ("input_ids", "labels") if k not in mb]
        raise KeyError(f"a micro-batch needs 'input_ids' and 'labels' (data/ batches), missing {missing}")
    ids = mb["input_ids"]
    labels = mb.get("labels")
    if labels is None:  # a loss hook without targets: the global target count is 0
        labels = torch.full_like(ids, IGNORE_INDEX)
    seq_idx = mb.get("seq_idx")
    if seq_idx is None:
        seq_idx = torch.zeros_like(ids, dtype=torch.int32)
    if ids.shape != labels.shape or ids.shape != seq_idx.shape or ids.dim() != 2:
        raise ValueError(f"micro-batch tensors must share one (batch, seq) shape: input_ids {tuple(ids.shape)}, "
                         f"labels {tuple(labels.shape)}, seq_idx {tuple(seq_idx.shape)}")
    return ids.to(device), labels.to(device), seq_idx.to(device)


_OWN_KEYS = ("input_ids", "labels", "seq_idx")


def _local_extras(mb: dict, batch: int, seq_len: int, local: torch.Tensor, device) -> dict:
    """The caller's other micro-batch entries as this rank sees them: (b, s, ...) tensors sliced along the sequence
    exactly like input_ids (on this device), everything else unchanged."""
    out = {}
    for key, value in mb.items():
        if key in _OWN_KEYS:
            continue
        if torch.is_tensor(value) and value.dim() >= 2 and tuple(value.shape[:2]) == (batch, seq_len):
            value = value.to(device)[:, local]
        out[key] = value
    return out
