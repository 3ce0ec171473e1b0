"""The policy side of GRPO: token log-probabilities, the GRPO loss as the parallel runner's loss hook, MTP on
detached features.

`GRPOLoss` is what `latentforge.train.parallel`'s runner calls on the last pipeline stage for each micro-batch, with the final
hidden state of this rank's token slice (context / sequence parallelism cut rows into pieces) and the micro-batch
tensors of rl.batch.collate sliced the same way. It returns this piece's share of the batch loss: every term is a
sum over tokens divided by a global count (per-row quantities such as a row's token count come precomputed on
the whole row), so the pieces of all micro-batches of all ranks add up to the single-process loss.
"""

from __future__ import annotations

from typing import Optional

import torch

from latentforge.kernels.cross_entropy import linear_cross_entropy
from latentforge.model.mtp import mtp_recursion
from latentforge.rl.batch import IGNORE_INDEX, BatchCounts
from latentforge.rl.losses import PolicyLossConfig, aggregate, per_token_policy_loss
from latentforge.train.loss import shifted_labels


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] per position, in fp32: the trainer's view of the sampling distribution."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def hidden_logprobs(
    hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """token_logprobs of the logits hidden @ head_weight.T, computed by the fused chunked lm_head + cross-entropy:
    fp32 logits whatever the compute dtype (bf16 logits would round log-probs by up to ~0.06 and skew the
    importance weights), and the (b, s, V) logits never exist whole."""
    b, s, h = hidden.shape
    ce = linear_cross_entropy(
        hidden.reshape(-1, h).float() / temperature, head_weight, targets.reshape(-1), reduction="none"
    )
    return -ce.view(b, s)


def mtp_detached_ce(depth_hidden, head_weight: torch.Tensor, labels: list, reduction: str = "sum") -> list:
    """MTP cross-entropies (one per depth) that train only the MTP block: `depth_hidden` yields each depth's
    hidden state of the MTP recursion run on detached inputs (`model.mtp.mtp_recursion(..., detach=True)`: the
    trunk's hidden state and the shared embeddings enter detached) and the shared lm_head enters detached, so
    drafting keeps up with the policy while the MTP loss never moves the trunk.

    `labels[k-1]`: the labels shifted left by k (on the whole sequence)."""
    head = head_weight.detach()
    return [
        linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]),
            head,
            shifted.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )
        for hidden, shifted in zip(depth_hidden, labels)
    ]


def mtp_detached_losses(
    model,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    hidden: torch.Tensor,
    seq_idx: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> list:
    """`mtp_detached_ce` on a whole (unsharded) model and full sequences."""
    depths = mtp_recursion(model.mtp, model.mtp_embeddings(input_ids), hidden, seq_idx=seq_idx, detach=True)
    shifted = [shifted_labels(labels, k) for k in range(1, model.cfg.mtp_depths + 1)]
    return mtp_detached_ce((h for h, _ in depths), model.lm_head.weight, shifted, reduction)


def aggregate_pieces(per_token: torch.Tensor, mb: dict, aggregation: str, counts: BatchCounts) -> torch.Tensor:
    """rl.losses.aggregate for a piece of rows: sequence-level aggregation divides each token by its *whole* row's
    token count (`row_tokens`, from collate), so the sum over pieces is the sum over rows."""
    if aggregation == "sequence":
        return (per_token / mb["row_tokens"]).sum() / max(counts.num_sequences, 1.0)
    return aggregate(
        per_token,
        mb["loss_mask"],
        aggregation,
        num_tokens=counts.num_tokens,
        num_sequences=counts.num_sequences,
        max_tokens=counts.max_tokens,
    )


def grpo_micro_batch_loss(
    logp: torch.Tensor,
    mb: dict,
    counts: BatchCounts,
    loss_cfg: PolicyLossConfig,
    *,
    train_version: int,
    prox_logp: Optional[torch.Tensor] = None,
):
    """(policy loss share, stats) of one micro-batch piece from the trainer's token log-probs `logp` (b, s): the
    per-token GRPO math of rl.losses, aggregated so that summing over pieces, micro-batches and ranks gives the
    batch loss. Stats are sums and maxima (`_max`).

    `prox_logp`: pi_prox, the log-probs under the weights at the start of the rollout batch (PPO mini-batches);
    None: one optimizer step per batch, so pi_prox is the current policy itself."""
    mask = mb["loss_mask"]
    old = logp.detach() if prox_logp is None else prox_logp
    per_token, stats = per_token_policy_loss(
        logp, old, mb["behaviour_logprobs"], mb["advantages"], mask, loss_cfg, ref_logp=mb.get("ref_logprobs")
    )
    loss = aggregate_pieces(per_token, mb, loss_cfg.aggregation, counts)
    stats["policy_loss"] = loss.detach()

    with torch.no_grad():
        # engine-vs-trainer mismatch where the rollout used exactly the weights being trained: rows whose every
        # stamped token has this version (a row that straddled an update may carry caches of the old weights)
        fresh = (mb["row_version"] == train_version) & (mask > 0)
        delta = (old - mb["behaviour_logprobs"]).abs()
        stats["fresh_tokens"] = fresh.float().sum()
        stats["mismatch_fresh_sum"] = (delta * fresh).sum()
        stats["mismatch_fresh_max"] = (delta * fresh).max() if fresh.any() else torch.zeros(())
        stale = (train_version - mb["versions"]).clamp(min=0)
        stats["staleness_sum"] = (stale * mask).sum()
        stats["entropy_proxy_sum"] = (-old * mask).sum()  # mean -log p of the sampled tokens
    return loss, stats


class GRPOLoss:
    """The runner's loss hook for one GRPO step: (TrunkOutput, local micro-batch) -> (loss share, stats).

    The policy term trains the trunk and lm_head; the MTP term (weight `mtp_loss_weight`, cross-entropy summed
    over tokens and divided by depths x the batch's positions, so independent of how rows are split) trains only
    the MTP block. The MoE balance loss is the runner's own, as in pretraining."""

    def __init__(
        self,
        counts: BatchCounts,
        loss_cfg: PolicyLossConfig,
        *,
        temperature: float,
        train_version: int,
        mtp_loss_weight: float = 0.0,
        prox_logprobs: Optional[dict] = None,
    ):
        self.counts, self.loss_cfg = counts, loss_cfg
        self.temperature, self.train_version = temperature, train_version
        self.mtp_loss_weight = mtp_loss_weight
        self.prox_logprobs = prox_logprobs  # ProximalLogprobs.by_key of this batch (PPO mini-batches), or None

    def __call__(self, out, mb: dict):
        logp = hidden_logprobs(out.hidden, out.lm_head_weight, mb["targets"], self.temperature)
        prox = None if self.prox_logprobs is None else self.prox_logprobs[mb[PROX_KEY]]
        loss, stats = grpo_micro_batch_loss(
            logp, mb, self.counts, self.loss_cfg, train_version=self.train_version, prox_logp=prox
        )
        if self.mtp_loss_weight > 0 and out.part.mtp is not None and out.mtp_embeddings:
            sums = mtp_detached_ce(out.mtp_hidden(detach=True), out.lm_head_weight, out.mtp_labels, reduction="sum")
            mtp_loss = torch.stack(sums).sum() / (len(sums) * max(self.counts.num_positions, 1.0))
            loss = loss + self.mtp_loss_weight * mtp_loss
            stats["mtp_loss_sum"] = mtp_loss.detach()
        return loss, stats


PROX_KEY = "prox_key"  # a micro-batch's name for its pi_prox log-probs (a plain value: the runner passes it as is)


class ProximalLogprobs:
    """A forward-only loss hook (runner.evaluate) that keeps this rank's token log-probs of each micro-batch
    piece under the current weights, by the micro-batch's PROX_KEY. Run at the start of a rollout batch it holds
    pi_prox; a later GRPOLoss on the same micro-batches reads it back (the runner slices a micro-batch the same
    way each time, so the piece a rank sees then is the piece it recorded)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.by_key: dict = {}

    def __call__(self, out, mb: dict):
        logp = hidden_logprobs(out.hidden, out.lm_head_weight, mb["targets"], self.temperature)
        self.by_key[mb[PROX_KEY]] = logp.detach()
        return logp.new_zeros(()), {}
