"""What one optimizer step's micro-batches look like on this rank, and the step's loss statistics.

`prepare` slices every micro-batch for this rank (CP token order, then the TP piece) and counts the global batch's
targets and sequences (`latentforge.train.loss.Normalizers`, summed over data-parallel ranks): the loss module
(train/loss.py, whose doc has the math) divides every partial loss by them, so that the partial losses of all
ranks, stages and micro-batches add up to the single-process loss of the whole global batch. The stage forward
(stage.py) records each term here; the runner sums the records over ranks.

A micro-batch's optional `attention_mask` (b, s; 0 = padding) keeps padded positions out of the balance loss, the
expert loads and the sequence count; its optional `routes` (b, s, trunk MoE layers, top_k), the rollout's expert
choices, are replayed (`replay_routes`) and compared with the router's own choice (router agreement statistics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from latentforge.model.hybrid import IGNORE_INDEX, HybridModel
from latentforge.model.mixer_types import MixerContext
from latentforge.model.mtp import mtp_recursion, shift_left
from latentforge.train.loss import Balance, HeadLosses, Normalizers, TokenPiece, balance, head_losses, shifted_labels

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

    `mtp_embeddings[k-1]` is the embedding of input_ids shifted left by k (computed on the last stage, which holds
    the embedding or, under pipeline parallelism, its own copy of it: stage.py) and `mtp_labels[k-1]` the labels
    shifted left by k (shifted on the full sequence, then sliced): `mtp_hidden()` runs the MTP recursion on them (every rank must run it equally often: its layers hold
    collectives); the MoE balance loss of the depths it ran is added by the runner."""

    hidden: torch.Tensor  # (b, s_local, H), after norm_f
    lm_head_weight: torch.Tensor  # (V, H), the full weight (tensor parallelism never splits lm_head)
    part: HybridModel  # this stage's model part (part.mtp, part.lm_head)
    mtp_embeddings: list
    mtp_labels: list
    seq_idx: torch.Tensor  # (b, s_cp) document ids of the tokens the mixers see (this CP rank's, TP-gathered)
    context: Optional[MixerContext] = None  # the layout's mixer context (HybridModel.forward's `context`)
    mtp_routings: list = field(default_factory=list)  # the MTP MoE's Routing of each depth run

    def mtp_hidden(self, detach: bool = False):
        """Yields h_k of MTP depth k = 1.. (model.mtp.mtp_recursion); `detach`: train the MTP block alone."""
        mtp = self.part.mtp
        if mtp is None:  # a model without MTP depths has no MTP embeddings: no depth to yield
            return
        for hidden, routing in mtp_recursion(
            mtp, self.mtp_embeddings, self.hidden, seq_idx=self.seq_idx, context=self.context, detach=detach
        ):
            self.mtp_routings.append(routing)
            yield hidden


# a caller's loss on the last stage: (TrunkOutput, the micro-batch sliced to this rank) -> (loss, stats)
LossHook = Callable[[TrunkOutput, dict], Any]


class ParallelContext:
    """Shared by the stage modules and the parallel mixers of one runner."""

    def __init__(self, groups, model_cfg, device, load_balance: bool = True, attention_block: int = 1024):
        self.groups = groups
        self.load_balance = load_balance  # the zigzag token order under CP (token_order.py)
        self.attention_block = attention_block
        self.cfg = model_cfg
        self.device = device
        lay = groups.layout
        self.cp, self.tp = lay.cp, lay.tp
        self.micro_batches: list[MicroBatch] = []
        self.counts: Optional[Normalizers] = None  # set by prepare()
        self.current: Optional[MicroBatch] = None  # set by begin()
        self.num_moe = 0  # expert-load rows: trunk MoE layers, then the MTP block's
        self.num_trunk_moe = 0
        # the caller's loss hook for the step in progress (None: LM/MTP head losses)
        self.loss_fn: Optional[LossHook] = None
        self.replay_routes = False  # the step in progress replays each micro-batch's `routes`
        # False for a step without CP (train.seq_len_schedule's cp: false): every CP rank holds whole sequences of
        # its own, as a data-parallel rank would, and the mixers run without the CP context
        self.context_parallel = True
        self.reset_step()

    @property
    def step_cp(self) -> int:
        """The CP size of the step in progress (1 for a step without CP)."""
        return self.cp if self.context_parallel else 1

    @property
    def step_cp_rank(self) -> int:
        return self.groups.cp_rank if self.context_parallel else 0

    def _sequence_readers(self):
        """The group whose ranks hold distinct sequences this step: dp, or dp x cp for a step without CP."""
        return self.groups.dp_group if self.step_cp == self.cp else self.groups.dp_cp_group

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
        counts[2 + depths :] = torch.tensor([n, n * n, 1], dtype=torch.float64)
        prepared = []
        for mb in micro_batches:
            ids, labels, seq_idx = _unpack(mb, self.device, labels_required)
            b, s = ids.shape
            order = self.token_order(s)
            local = self.local_index(s, order)
            pos_cp = order.positions(self.step_cp_rank, self.device)
            real = _attention_mask(mb, ids)
            counts[0] += (labels != IGNORE_INDEX).sum()
            counts[1] += b if real is None else (real.sum(1) > 0).sum()  # an all-padding row is no sequence
            item = MicroBatch(
                batch=b,
                seq_len=s,
                ids_local=ids[:, local],
                labels_local=labels[:, local],
                seq_local=seq_idx[:, local],
                seq_cp=seq_idx[:, pos_cp],
                seq_full=seq_idx,
                order=order,
                pos_cp=pos_cp,
                pos_all=order.all_positions(self.device),
                extras=_local_extras(mb, b, s, local, self.device),
            )
            if real is not None:
                item.real_local, item.row_tokens = real[:, local], real.sum(1)
            for k in range(1, depths + 1):
                depth_labels = shifted_labels(labels, k)
                counts[1 + k] += (depth_labels != IGNORE_INDEX).sum()
                item.mtp_ids_local.append(shift_left(ids, k, 0)[:, local])
                item.mtp_labels_local.append(depth_labels[:, local])
            prepared.append(item)
        all_reduce_sum(counts, self._sequence_readers())
        values = counts.tolist()
        total, squares, ranks = values[2 + depths :]
        if squares * ranks != total * total:  # not every data-parallel rank has the same number of micro-batches
            from .config import LayoutError

            raise LayoutError(
                f"forward_backward: the data-parallel ranks got different numbers of micro-batches "
                f"(this rank {n}, {total:g} over {ranks:g} ranks); every rank must run the same "
                "number per step (their collectives pair up)"
            )
        self.micro_batches = prepared
        self.counts = Normalizers(
            lm=max(values[0], 1.0),
            sequences=max(values[1], 1.0),
            mtp=[max(v, 1.0) for v in values[2 : 2 + depths]],
            targets=int(values[0]),
        )

    def token_order(self, seq_len: int) -> TokenOrder:
        # the conv history of a chunk comes from the chunk before it only
        return TokenOrder.choose(seq_len, self.step_cp, self.load_balance, min_chunk=self.cfg.conv_kernel - 1)

    def local_index(self, seq_len: int, order: Optional[TokenOrder] = None) -> torch.Tensor:
        """Global positions of this rank's tokens: its CP tokens (token_order.py), then the TP (sequence-parallel)
        piece of them."""
        pieces = self.step_cp * self.tp
        if seq_len % pieces:
            from .config import LayoutError

            raise LayoutError(
                f"sequence length {seq_len} must be divisible by cp ({self.step_cp}) x tp ({self.tp}) = "
                f"{pieces}; change the sequence length"
            )
        order = order or self.token_order(seq_len)
        size = seq_len // pieces
        start = self.groups.tp_rank * size
        return order.positions(self.step_cp_rank, self.device)[start : start + size]

    def begin(self, index: int) -> MicroBatch:
        # stays current until the next begin: an activation-checkpoint recompute in the backward reads it too
        mb = self.micro_batches[index]
        self.current = mb
        return mb

    def current_batch(self) -> MicroBatch:
        """The micro-batch whose stage forward (or its recompute in the backward) is running."""
        if self.current is None:
            raise RuntimeError("ParallelContext.begin(index) must run before the stage forward reads the micro-batch")
        return self.current

    def normalizers(self) -> Normalizers:
        """The global batch's target and sequence counts every partial loss is divided by."""
        if self.counts is None:
            raise RuntimeError("ParallelContext.prepare(micro_batches) must run before the step's losses")
        return self.counts

    def mixer_context(self) -> Optional[MixerContext]:
        """What HybridModel.forward hands the mixers under this layout: context parallelism's view of the current
        micro-batch (context_parallel.py), None on one process, TP alone, or a step without CP."""
        if self.step_cp == 1:
            return None
        from .context_parallel import ContextParallelMixing

        return ContextParallelMixing(
            self.current_batch(), self.groups.cp_group, self.groups.cp_rank, self.attention_block
        )

    # ----- MoE routing -----------------------------------------------------------------------------------------
    def replayed_routes(self) -> Optional[torch.Tensor]:
        """The micro-batch's recorded routes (b, s_local, trunk MoE layers, top_k) when replaying, else None."""
        if not self.replay_routes:
            return None
        routes = self.current_batch().extras.get("routes")
        if routes is None:
            raise ValueError(
                "rl.router_replay=true but the batch carries no routes: the rollout engine must "
                "record them (Sample.routes), or set rl.router_replay=false"
            )
        return routes

    @torch.no_grad()
    def record_agreement(self, routing: dict) -> None:
        """When the micro-batch carries the rollout's routes, count per real token and trunk MoE layer whether the
        router's own top-k set equals the recorded one (`router_agree_sum` / `router_pairs` statistics)."""
        mb = self.current_batch()
        recorded = mb.extras.get("routes")
        if recorded is None or not routing:
            return
        real = mb.real_local
        for index, r in routing.items():
            mine = recorded[:, :, index].reshape(-1, r.router_topk.shape[-1]).to(r.router_topk.device)
            same = (r.router_topk.sort(-1).values == mine.sort(-1).values).all(-1)
            counted = torch.ones_like(same) if real is None else real.reshape(-1).to(same.device)
            self._add_stat("router_agree_sum", (same & counted).sum())
            self._add_stat("router_pairs", counted.sum())

    def balance_loss(self, routings: list) -> Optional[torch.Tensor]:
        """The weighted balance-loss partial of (expert-load row, Routing) pairs; records it and the loads."""
        mb = self.current_batch()
        piece = TokenPiece(
            batch=mb.batch,
            seq_len=mb.seq_len,
            real=mb.real_local,
            row_tokens=mb.row_tokens,
            seq_group=self.groups.seq_group if self.step_cp > 1 else self.groups.tp_group,
        )
        result: Balance = balance(routings, piece, self.normalizers())
        for row, load in result.loads.items():
            self.load[row] += load.to(self.load.device)
        if result.loss is None:
            return None
        self.stat_aux += result.loss.detach().double()
        return self.cfg.moe_aux_loss_coeff * result.loss

    # ----- heads -----------------------------------------------------------------------------------------------
    def head_loss(self, part, hidden, mtp_embeddings, context=None) -> tuple:
        """(LM + weighted MTP partial loss, the MTP MoE's routing per depth) of the last stage; records them."""
        mb = self.current_batch()
        heads: HeadLosses = head_losses(
            hidden,
            part.lm_head.weight,
            mb.labels_local,
            self.normalizers(),
            mtp=part.mtp,
            mtp_embeddings=mtp_embeddings,
            mtp_labels=mb.mtp_labels_local,
            seq_idx=mb.seq_cp,
            context=context,
        )
        self.stat_lm += heads.lm.detach().double()
        for k, term in enumerate(heads.mtp):
            self.stat_mtp[k] += term.detach().double()
        return heads.weighted(self.cfg), heads.mtp_routings

    def custom_loss(self, part, hidden, mtp_embeddings, context=None) -> tuple:
        """The caller's loss hook on the last stage (instead of head_loss): (its loss, the MTP MoE's routing of
        each depth it ran); records its loss and statistics."""
        if self.loss_fn is None:
            raise RuntimeError("custom_loss runs only for a step given a loss_fn (head_loss otherwise)")
        mb = self.current_batch()
        output = TrunkOutput(
            hidden=hidden,
            lm_head_weight=part.lm_head.weight,
            part=part,
            mtp_embeddings=list(mtp_embeddings),
            mtp_labels=list(mb.mtp_labels_local),
            seq_idx=mb.seq_cp,
            context=context,
        )
        local = {"input_ids": mb.ids_local, "labels": mb.labels_local, "seq_idx": mb.seq_local, **mb.extras}
        returned = self.loss_fn(output, local)
        if not (isinstance(returned, tuple) and len(returned) == 2 and isinstance(returned[1], dict)):
            raise TypeError(
                "loss_fn must return (loss, stats): a 0-dim tensor and a dict of 0-dim tensors, got "
                f"{type(returned).__name__}"
            )
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
            self._add_stat(key, value.reshape(()))
        return loss, output.mtp_routings

    def _add_stat(self, key: str, value: torch.Tensor) -> None:
        """A statistic summed over micro-batches (keys ending in `_max`: their maximum)."""
        value = value.detach().to(device=self.device, dtype=torch.float64)
        old = self.custom_stats.get(key)
        if old is None:
            self.custom_stats[key] = value.clone()
        else:
            self.custom_stats[key] = torch.maximum(old, value) if key.endswith("_max") else old + value


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
        raise ValueError(
            f"micro-batch tensors must share one (batch, seq) shape: input_ids {tuple(ids.shape)}, "
            f"labels {tuple(labels.shape)}, seq_idx {tuple(seq_idx.shape)}"
        )
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
