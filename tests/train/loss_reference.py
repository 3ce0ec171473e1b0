"""An independent, deliberately plain computation of the training loss of a whole model on one batch (no helper of
latentforge.train.loss): full logits and F.cross_entropy per head, the MTP recursion written out, the sequence
balance loss per sequence and expert by its definition. Tests compare the loss module and the parallel runner to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Reference:
    loss: torch.Tensor
    lm_loss: torch.Tensor
    mtp_losses: list
    aux_loss: torch.Tensor
    expert_load: torch.Tensor  # (trunk MoE layers + MTP, E) long


def _shift(t: torch.Tensor, k: int, fill) -> torch.Tensor:
    return torch.cat([t[:, k:], torch.full_like(t[:, :k], fill)], dim=1)


def _ce(model, hidden, labels):
    logits = model.lm_head(hidden).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _balance(scores: torch.Tensor, topk: torch.Tensor, batch: int, top_k: int) -> torch.Tensor:
    """Mean over sequences of sum_e f_e P_e (DeepSeek-V3), from its definition."""
    seq = scores.shape[0] // batch
    experts = scores.shape[-1]
    scores, topk = scores.view(batch, seq, experts), topk.view(batch, seq, top_k)
    total = scores.new_zeros(())
    for b in range(batch):
        chosen = torch.stack([(topk[b] == e).any(-1).float().sum() for e in range(experts)])
        f = experts / (top_k * seq) * chosen
        p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
        total = total + (f * p).sum()
    return total / batch


def reference_loss(model, input_ids, labels, seq_idx=None) -> Reference:
    cfg = model.cfg
    out = model(input_ids, seq_idx=seq_idx, with_logits=False)
    lm = _ce(model, out.hidden, labels)
    mtp_losses, aux_terms, previous = [], [], out.hidden
    loads = [torch.bincount(out.routing[m].topk_idx.flatten(), minlength=cfg.num_experts) for m in sorted(out.routing)]
    aux_terms = [
        _balance(out.routing[m].scores, out.routing[m].topk_idx, input_ids.shape[0], cfg.top_k)
        for m in sorted(out.routing)
    ]
    mtp_load = 0
    for k in range(1, cfg.mtp_depths + 1):
        previous, routing = model.mtp(model.backbone.embeddings(_shift(input_ids, k, 0)), previous, seq_idx=seq_idx)
        mtp_losses.append(_ce(model, previous, _shift(labels, k, -100)))
        aux_terms.append(_balance(routing.scores, routing.topk_idx, input_ids.shape[0], cfg.top_k))
        mtp_load = mtp_load + torch.bincount(routing.topk_idx.flatten(), minlength=cfg.num_experts)
    if cfg.mtp_depths:
        loads.append(mtp_load)
    aux = sum(aux_terms)
    loss = lm + cfg.moe_aux_loss_coeff * aux
    if mtp_losses:
        loss = loss + cfg.mtp_loss_weight / len(mtp_losses) * sum(mtp_losses)
    return Reference(loss=loss, lm_loss=lm, mtp_losses=mtp_losses, aux_loss=aux, expert_load=torch.stack(loads))
