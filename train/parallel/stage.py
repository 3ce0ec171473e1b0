"""A pipeline stage: the part of the model one rank runs for one stage, and the forward that drives it.

`split_model` hands each stage a `HybridModel` shell that holds only its own modules (the first stage the
embedding, the last the final norm, lm_head and MTP block), under the unsharded model's names: layers sit in a
ModuleDict keyed by their index in the full model, so `backbone.layers.7.mixer...` is the same key in every layout
(that is what lets DCP reshard a checkpoint from one layout to another).

With MTP depths the last stage also holds its own copy of the embedding (as Megatron's shared word-embedding group
does for a weight used on the first and last stage): it embeds the micro-batch's shifted tokens for the MTP block
itself, so stage boundaries carry only the hidden state. The copy has the embedding's name
(`backbone.embeddings.weight`: a checkpoint holds it once, DCP dedups the equal write of the two ranks), starts
equal (same weights / same unit seed) and stays equal: the runner sums its gradient with the first stage's
(grads.all_reduce_shared_embedding_grads) before the optimizer step.

`StageModule` wraps a part and runs the part's own forward (`HybridModel.forward`: embedding if it has it and is
the first stage, its layers, final norm if it has it). The first stage's forward takes the micro-batch index (a
(1,) long tensor: the stage looks the micro-batch up in the shared context); every later stage takes what the
previous one returned: (index, hidden). The last stage returns its partial loss (train/loss.py:
the LM/MTP head losses, or the caller's loss hook) as a (1,) tensor. The losses come from what the forward returns
(hidden state, each MoE layer's routing); the MoE balance loss of a non-last stage reaches the backward through
`AuxLossInjector` on the stage output.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from latentforge.model.hybrid import HybridModel

from .context import ParallelContext


class AuxLossInjector(torch.autograd.Function):
    """Identity on `hidden`; in the backward it also hands `aux` a gradient of 1 (it is already weighted), so a
    loss computed on a non-last pipeline stage is trained without travelling down the pipeline."""

    @staticmethod
    def forward(ctx, hidden, aux):
        ctx.aux_dtype = aux.dtype
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones((), dtype=ctx.aux_dtype, device=grad.device)


class StageModule(nn.Module):
    part: HybridModel
    ctx: ParallelContext

    def __init__(self, part: HybridModel, ctx: ParallelContext, *, first: bool, last: bool):
        super().__init__()
        self.part = part
        self.first, self.last = first, last
        # the context is shared, not owned: keep it out of the module tree
        object.__setattr__(self, "ctx", ctx)

    def forward(self, mb_index: torch.Tensor, *activations):
        ctx, part = self.ctx, self.part
        mb = ctx.begin(int(mb_index.reshape(-1)[0]))
        if self.first:
            ids, previous = mb.ids_local, None
        else:
            ids, (previous,) = None, activations
        context = ctx.mixer_context()
        out = part(
            ids, hidden=previous, seq_idx=mb.seq_cp, context=context, routes=ctx.replayed_routes(), with_logits=False
        )
        ctx.record_agreement(out.routing)
        aux = ctx.balance_loss(sorted(out.routing.items()))  # this stage's trunk MoE layers
        if not self.last:
            hidden = out.hidden if aux is None else AuxLossInjector.apply(out.hidden, aux)
            return (mb_index, hidden)
        # the MTP inputs: this stage's embedding (the first stage's, or the last stage's copy) of the shifted tokens
        mtp_embeddings = [part.backbone.embeddings(shifted) for shifted in mb.mtp_ids_local]
        if ctx.loss_fn is not None:  # the caller's loss hook (runner.forward_backward(..., loss_fn))
            loss, mtp_routings = ctx.custom_loss(part, out.hidden, mtp_embeddings, context)
        else:
            loss, mtp_routings = ctx.head_loss(part, out.hidden, mtp_embeddings, context)
        mtp_aux = ctx.balance_loss([(ctx.num_trunk_moe, routing) for routing in mtp_routings])
        for term in (aux, mtp_aux):
            if term is not None:
                loss = loss + term
        return torch.stack([loss])  # a (1,) tensor that is not a view: FSDP2 warns on view outputs


def split_model(model, stage_layers: list, stage_ids: list) -> list:
    """One HybridModel shell per stage in `stage_ids`, holding (not copying) that stage's modules of `model`; the
    last stage also holds this rank's embedding when the model has MTP depths (module doc; the first stage runs on
    another rank whenever there are several stages: stage s runs on rank s % pp and there are pp x virtual)."""
    heavy = {
        "embeddings": model.backbone.embeddings,
        "layers": model.backbone.layers,
        "norm_f": model.backbone.norm_f,
        "lm_head": model.lm_head,
        "mtp": model.mtp,
    }
    last = len(stage_layers) - 1
    parts = []
    # copy the module skeleton without its parameters, then put the stage's own modules in
    model.backbone.embeddings = model.backbone.layers = model.backbone.norm_f = None
    model.lm_head = model.mtp = None
    try:
        for s in stage_ids:
            shell = copy.deepcopy(model)
            shell.backbone.layers = nn.ModuleDict({str(i): heavy["layers"][i] for i in stage_layers[s]})
            if s == 0:
                shell.backbone.embeddings = heavy["embeddings"]
            if s == last:
                shell.backbone.norm_f = heavy["norm_f"]
                shell.lm_head = heavy["lm_head"]
                shell.mtp = heavy["mtp"]
                if model.cfg.mtp_depths and last > 0:
                    shell.backbone.embeddings = heavy["embeddings"]
            parts.append(shell)
    finally:
        model.backbone.embeddings, model.backbone.layers = heavy["embeddings"], heavy["layers"]
        model.backbone.norm_f, model.lm_head, model.mtp = heavy["norm_f"], heavy["lm_head"], heavy["mtp"]
    return parts
