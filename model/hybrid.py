"""The hybrid stack: embedding -> pre-norm residual layers (one mixer each) -> final norm -> lm_head, plus MTP.

Module names follow the Hugging Face `NemotronHForCausalLM` checkpoint (SPEC section 4), so a state dict is a
checkpoint (routed experts stay stacked; `model/hf.py` splits them per expert).
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from latentforge.kernels.cross_entropy import linear_cross_entropy

from .attention import Attention
from .config import ModelConfig
from .mamba import Mamba2Mixer
from .mlp import MLP
from .moe import LatentMoE
from .mtp import MTPBlock, shift_left
from .norm import RMSNorm

IGNORE_INDEX = -100


def build_mixer(kind: str, cfg: ModelConfig) -> nn.Module:
    if kind == "mamba":
        return Mamba2Mixer(cfg)
    if kind == "attention":
        return Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
    if kind == "moe":
        return LatentMoE(cfg)
    if kind == "mlp":
        return MLP(cfg.hidden_size, cfg.mlp_intermediate_size)
    raise ValueError(f"unknown layer kind {kind!r}")


class Block(nn.Module):
    """`x + mixer(RMSNorm(x))`."""

    def __init__(self, kind: str, cfg: ModelConfig):
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = build_mixer(kind, cfg)

    def forward(self, x: torch.Tensor, seq_idx=None, state=None, context=None) -> torch.Tensor:
        return x + self.mixer(self.norm(x), seq_idx=seq_idx, state=state, context=context)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(kind, cfg) for kind in cfg.layer_types])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)


@dataclass
class ModelOutput:
    loss: Optional[torch.Tensor] = None  # lm_loss + MTP losses (weighted) + MoE aux loss (weighted)
    lm_loss: Optional[torch.Tensor] = None
    mtp_losses: list = field(default_factory=list)  # one CE per depth, unweighted
    aux_loss: Optional[torch.Tensor] = None  # sum over MoE layers, unweighted
    logits: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None  # final-normed trunk output (the lm_head input)
    expert_load: Optional[torch.Tensor] = None  # (n_moe_layers, E) tokens per expert in this forward


class HybridModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = MTPBlock(cfg) if cfg.mtp_depths > 0 else None
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    # ----- initialisation --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self):
        """SPEC section 3 init. Output projections get std / sqrt(2 * layers) when `scale_output_init`."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers) if self.cfg.scale_output_init else std
        nn.init.normal_(self.backbone.embeddings.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        self.backbone.norm_f.init_weights()
        for block in self.backbone.layers:
            block.norm.init_weights()
            block.mixer.init_weights(std, out_std)
        if self.mtp is not None:
            self.mtp.init_weights(std, out_std)

    # ----- forward -----------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                seq_idx: Optional[torch.Tensor] = None, cache=None) -> ModelOutput:
        """Training (labels given): losses. Otherwise: logits of every position (and the hidden state).

        `cache` (inference): an object whose `layers[i]` is layer i's state dict (the generation engine's slot
        states, `model.engine`); layers read and update their states in it.
        """
        x = self.backbone.embeddings(input_ids)
        for i, block in enumerate(self.backbone.layers):
            x = block(x, seq_idx=seq_idx, state=None if cache is None else cache.layers[i])
        hidden = self.backbone.norm_f(x)
        trunk_moe = [b.mixer for b in self.backbone.layers if b.kind == "moe"]
        aux_terms = [m.aux_loss for m in trunk_moe if m.aux_loss is not None]
        loads = [m.load for m in trunk_moe]
        out = ModelOutput(hidden=hidden, expert_load=torch.stack(loads) if loads else None)
        if labels is None:
            out.logits = self.lm_head(hidden)
            return out

        out.lm_loss = self.head_loss(hidden, labels)
        out.loss = out.lm_loss
        if self.mtp is not None:
            mtp_moe, mtp_load = self.mtp.layers[1].mixer, 0
            for depth_loss in self._mtp_depths(input_ids, labels, hidden, seq_idx):
                # the shared block runs once per depth: every depth's balance loss and routing counts
                out.mtp_losses.append(depth_loss)
                aux_terms.append(mtp_moe.aux_loss)
                mtp_load = mtp_load + mtp_moe.load
            loads.append(mtp_load)
            out.loss = out.loss + self.cfg.mtp_loss_weight / len(out.mtp_losses) * sum(out.mtp_losses)
        if aux_terms:
            out.aux_loss = sum(aux_terms)
            out.loss = out.loss + self.cfg.moe_aux_loss_coeff * out.aux_loss
        out.expert_load = torch.stack(loads) if loads else None
        return out

    def head_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, labels.reshape(-1),
                                    ignore_index=IGNORE_INDEX)

    def mtp_losses(self, input_ids, labels, hidden, seq_idx=None) -> list:
        """CE of each MTP depth k = 1..D: position t predicts token t+k+1 from h_{k-1}(t) and token t+k."""
        return list(self._mtp_depths(input_ids, labels, hidden, seq_idx))

    def _mtp_depths(self, input_ids, labels, hidden, seq_idx):
        previous = hidden
        for k in range(1, self.cfg.mtp_depths + 1):
            embedded = self.backbone.embeddings(shift_left(input_ids, k, 0))
            previous = self.mtp(embedded, previous, seq_idx=seq_idx)
            yield self.head_loss(previous, shift_left(labels, k, IGNORE_INDEX))

    # ----- MoE balancing -----------------------------------------------------------------------------------
    def moe_layers(self) -> list:
        """Every LatentMoE, trunk first, then the MTP block's (the rows of `expert_load`)."""
        return [m for m in self.modules() if isinstance(m, LatentMoE)]

    @torch.no_grad()
    def update_expert_bias(self, global_load: torch.Tensor):
        """After an optimizer step: `bias += rate * sign(mean_load - load)` per MoE layer (SPEC section 3).

        `global_load` (n_moe_layers, E): token counts summed over the step's micro-batches and data-parallel ranks.
        """
        layers = self.moe_layers()
        if global_load.shape[0] != len(layers):
            raise ValueError(f"global_load has {global_load.shape[0]} rows for {len(layers)} MoE layers")
        for layer, load in zip(layers, global_load):
            layer.update_bias(load, self.cfg.expert_bias_update_rate)
