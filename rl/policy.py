"""The policy side of GRPO on one model: token log-probabilities, the micro-batch loss, MTP on detached features.

`PolicyForward` runs the model once per micro-batch (logits, MTP sums, MoE balance loss);
`grpo_micro_batch_loss` turns that and the micro-batch tensors of rl.batch.collate into this micro-batch's share of
the batch loss plus summed statistics.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kernels.cross_entropy import linear_cross_entropy
from model.mtp import shift_left
from rl.batch import BatchCounts
from rl.losses import PolicyLossConfig, aggregate, per_token_policy_loss

IGNORE_INDEX = -100


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] per position, in fp32: the trainer's view of the sampling distribution."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


def mtp_detached_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor,
                        seq_idx: Optional[torch.Tensor] = None, reduction: str = "mean") -> list:
    """MTP cross-entropies (one per depth) that train only the MTP block: the trunk's hidden state, the shared
    embedding and the shared lm_head enter detached, so drafting keeps up with the policy while the MTP loss
    never moves the trunk (the same recursion as HybridModel.mtp_losses)."""
    losses, previous = [], hidden.detach()
    head = model.lm_head.weight.detach()
    for k in range(1, model.cfg.mtp_depths + 1):
        embedded = model.backbone.embeddings(shift_left(input_ids, k, 0)).detach()
        previous = model.mtp(embedded, previous, seq_idx=seq_idx)
        shifted = shift_left(labels, k, IGNORE_INDEX)
        if bool((shifted != IGNORE_INDEX).any()):
            losses.append(linear_cross_entropy(previous.reshape(-1, previous.shape[-1]), head, shifted.reshape(-1),
                                               ignore_index=IGNORE_INDEX, reduction=reduction))
        else:
            losses.append(previous.sum() * 0.0)
    return losses


class PolicyForward(nn.Module):
    """Everything the GRPO loss needs from the model, in one forward (so DistributedDataParallel sees every
    parameter use): logits, the MTP cross-entropy sums per depth on detached trunk features, the trunk's MoE
    balance loss."""

    def __init__(self, model, with_mtp: bool):
        super().__init__()
        self.model = model
        self.with_mtp = with_mtp and getattr(model, "mtp", None) is not None

    def forward(self, input_ids: torch.Tensor, mtp_labels: Optional[torch.Tensor] = None):
        out = self.model(input_ids)
        mtp = None
        if self.with_mtp and mtp_labels is not None:
            mtp = torch.stack(mtp_detached_losses(self.model, input_ids, mtp_labels, out.hidden, reduction="sum"))
        # the trunk's MoE layers only: the MTP block's layer holds the aux loss of an earlier forward
        aux = [b.mixer.aux_loss for b in self.model.backbone.layers
               if b.kind == "moe" and b.mixer.aux_loss is not None]
        return out.logits, mtp, (sum(aux) if aux else None)


def mtp_labels_of(mb: dict) -> torch.Tensor:
    return torch.where(mb["valid"], mb["targets"], torch.full_like(mb["targets"], IGNORE_INDEX))


def grpo_micro_batch_loss(logits, mtp_sums, aux_loss, mb: dict, counts: BatchCounts, loss_cfg: PolicyLossConfig, *,
                          temperature: float, train_version: int, mtp_loss_weight: float = 0.0,
                          moe_aux_loss_coeff: float = 0.0, total_sequences: int = 1,
                          ref_logprobs: Optional[torch.Tensor] = None):
    """(loss, stats) of one micro-batch; summing `loss` over every micro-batch of every rank gives the batch loss.

    stats are sums (tokens, clipped counts, mismatch sums...) and maxima (keys ending in `_max`).
    """
    mask = mb["loss_mask"]
    logp = token_logprobs(logits, mb["targets"], temperature)
    old = logp.detach()  # one optimizer update per batch: pi_old is the policy at the start of this step
    per_token, stats = per_token_policy_loss(logp, old, mb["behaviour_logprobs"], mb["advantages"], mask, loss_cfg,
                                             ref_logp=ref_logprobs)
    loss = aggregate(per_token, mask, loss_cfg.aggregation, num_tokens=counts.num_tokens,
                     num_sequences=counts.num_sequences, max_tokens=counts.max_tokens)
    stats["policy_loss"] = loss.detach()

    with torch.no_grad():
        # engine-vs-trainer mismatch where the rollout used exactly the weights being trained: rows whose every
        # token has staleness 0 (a row that straddled an update may carry caches of the old weights)
        stamped = mb["versions"] >= 0
        row_fresh = ((mb["versions"] == train_version) | ~stamped).all(dim=1, keepdim=True) & stamped.any(1, True)
        fresh = row_fresh & (mask > 0)
        delta = (old - mb["behaviour_logprobs"]).abs()
        stats["fresh_tokens"] = fresh.float().sum()
        stats["mismatch_fresh_sum"] = (delta * fresh).sum()
        stats["mismatch_fresh_max"] = (delta * fresh).max() if fresh.any() else torch.zeros(())
        stale = (train_version - mb["versions"]).clamp(min=0)
        stats["staleness_sum"] = (stale * mask).sum()
        stats["entropy_proxy_sum"] = (-old * mask).sum()  # mean -log p of the sampled tokens

    if aux_loss is not None and moe_aux_loss_coeff > 0:
        # the balance loss is per micro-batch (as in pretraining), weighted by the micro-batch's share of rows
        share = mb["input_ids"].shape[0] / max(total_sequences, 1)
        loss = loss + moe_aux_loss_coeff * aux_loss * share
        stats["aux_loss_sum"] = aux_loss.detach() * share
    if mtp_sums is not None and mtp_loss_weight > 0:
        # summed over tokens, divided by the batch's positions: independent of the micro-batch split
        mtp_loss = mtp_sums.sum() / (mtp_sums.numel() * max(counts.num_positions, 1.0))
        loss = loss + mtp_loss_weight * mtp_loss
        stats["mtp_loss_sum"] = mtp_loss.detach()
    return loss, stats


def add_stats(total: dict, new: dict) -> dict:
    """Accumulate statistics: `_max` keys by maximum, the rest by sum."""
    for key, value in new.items():
        value = float(value)
        if key.endswith("_max"):
            total[key] = max(total.get(key, float("-inf")), value)
        else:
            total[key] = total.get(key, 0.0) + value
    return total
