"""The hybrid stack: embedding -> pre-norm residual layers (one mixer each) -> final norm -> lm_head, plus MTP.

Module names follow the Hugging Face `NemotronHForCausalLM` checkpoint (SPEC section 4), so a state dict is a
checkpoint (routed experts stay stacked; `model/hf.py` splits them per expert).
"""

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union, cast

import torch
from torch import nn

from .attention import Attention
from .config import ModelConfig
from .mamba import Mamba2Mixer
from .mixer_types import LayerCache, LayerState, MixerContext
from .mlp import MLP
from .moe import LatentMoE, Routing
from .mtp import MTPBlock, shift_left
from .norm import RMSNorm

IGNORE_INDEX = -100

Mixer = Union[Mamba2Mixer, Attention, LatentMoE, MLP]


def build_mixer(kind: str, cfg: ModelConfig) -> Mixer:
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
    """`x + mixer(RMSNorm(x))`; forward returns (x, Routing of a MoE layer or None)."""

    def __init__(self, kind: str, cfg: ModelConfig) -> None:
        super().__init__()
        self.kind = kind
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer: Mixer = build_mixer(kind, cfg)

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: Optional[torch.Tensor] = None,
        state: Optional[LayerState] = None,
        context: Optional[MixerContext] = None,
        routes: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, Optional[Routing]]:
        h = self.norm(x)
        if self.kind == "moe":
            y, routing = self.mixer(h, seq_idx=seq_idx, state=state, context=context, routes=routes)
            return x + y, routing
        return x + self.mixer(h, seq_idx=seq_idx, state=state, context=context), None


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([Block(kind, cfg) for kind in cfg.layer_types])
        self.norm_f = RMSNorm(cfg.hidden_size, cfg.norm_eps)


@dataclass
class ModelOutput:
    """What a model (or a pipeline stage's part of it) computed; the losses are `latentforge.train.loss`'s."""

    hidden: torch.Tensor  # (b, s, H): after norm_f when the part has it (the lm_head input), else the residual
    routing: dict[int, Routing] = field(
        default_factory=dict
    )  # trunk MoE index -> Routing, for the MoE layers this part ran
    logits: Optional[torch.Tensor] = None  # (b, s, V) when asked for and the part has the lm_head

    @property
    def routes(self) -> Optional[torch.Tensor]:
        """(b, s, MoE layers run, top_k) expert ids, in trunk order (what routing replay takes back); None
        without MoE layers."""
        if not self.routing:
            return None
        b, s = self.hidden.shape[:2]
        return torch.stack([self.routing[i].topk_idx.view(b, s, -1) for i in sorted(self.routing)], dim=2)


class HybridModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = MTPBlock(cfg) if cfg.mtp_depths > 0 else None
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    # ----- initialisation --------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """SPEC section 3 init. Output projections get std / sqrt(2 * layers) when `scale_output_init`."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers) if self.cfg.scale_output_init else std
        nn.init.normal_(self.backbone.embeddings.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        self.backbone.norm_f.init_weights()
        for _, block in self.numbered_layers():
            block.norm.init_weights()
            block.mixer.init_weights(std, out_std)
        if self.mtp is not None:
            self.mtp.init_weights(std, out_std)

    # ----- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        *,
        hidden: Optional[torch.Tensor] = None,
        seq_idx: Optional[torch.Tensor] = None,
        cache: Optional[LayerCache] = None,
        context: Optional[MixerContext] = None,
        routes: Optional[torch.Tensor] = None,
        with_logits: bool = True,
    ) -> ModelOutput:
        """The one forward of every path: training (each pipeline stage runs its part of the model), decoding,
        RL log-probs. A part (pipeline stage, `train.parallel.stage.split_model`) may lack the embedding (it
        takes the previous stage's `hidden` instead of `input_ids`), the final norm or the lm_head: they are
        skipped. Returns the hidden state and each trunk MoE layer's routing, for the losses (train/loss.py).

        `seq_idx` (b, s): document ids of packed sequences (states and attention reset at each new document).
        `cache` (inference): an object whose `layers[i]` is layer i's state dict (the generation engine's slot
        states, `model.engine`); layers read and update their states in it.
        `context`: the parallel layout's mixer context (None on one process; train/parallel).
        `routes` (b, s, trunk MoE layers, top_k): replayed expert ids (rollout routing replay); the trunk MoE
        layer with index m (its position among the trunk's MoE layers) routes by `routes[:, :, m]`.
        `with_logits`: also return lm_head(hidden) (b, s, V); training's fused loss never builds them.
        """
        x = self._embed(input_ids, hidden)
        moe_index, routing = self.trunk_moe_index, {}
        if routes is not None and (routes.dim() != 4 or routes.shape[2] != len(moe_index)):
            raise ValueError(
                f"routes must be (batch, seq, {len(moe_index)} MoE layers, top_k), got "
                f"{tuple(routes.shape)}: record them with the same model config"
            )
        for index, block in self.numbered_layers():
            moe = moe_index.get(index)
            layer_routes = None if routes is None or moe is None else routes[:, :, moe]
            state = None if cache is None else cache.layers[index]
            x, layer_routing = block(x, seq_idx=seq_idx, state=state, context=context, routes=layer_routes)
            if layer_routing is not None:
                routing[moe] = layer_routing
        if self.backbone.norm_f is not None:
            x = self.backbone.norm_f(x)
        out = ModelOutput(hidden=x, routing=routing)
        if with_logits and self.lm_head is not None and self.backbone.norm_f is not None:
            out.logits = self.lm_head(x)
        return out

    def _embed(self, input_ids: Optional[torch.Tensor], hidden: Optional[torch.Tensor]) -> torch.Tensor:
        # a later pipeline stage takes the previous one's hidden state; the last one may still hold an embedding
        # (its copy for the MTP block: train/parallel/stage.py), which it never applies to the trunk's input
        later_stage = isinstance(self.backbone.layers, nn.ModuleDict) and "0" not in self.backbone.layers
        if self.backbone.embeddings is None or later_stage:
            if hidden is None:
                raise ValueError(
                    "this model part has no embedding (a later pipeline stage): pass the previous "
                    "stage's output as hidden="
                )
            return hidden
        if input_ids is None:
            raise ValueError("HybridModel.forward needs input_ids (token ids, (batch, seq))")
        return self.backbone.embeddings(input_ids)

    def numbered_layers(self) -> Iterable[tuple[int, Block]]:
        """(index in the whole model, block) of the layers this model (or pipeline part) holds, in order."""
        layers = self.backbone.layers
        # torch's stubs type a container's items as Module; the backbone only ever holds Blocks
        if isinstance(layers, nn.ModuleDict):
            return [(int(k), cast(Block, b)) for k, b in layers.items()]
        return enumerate(cast(Iterable[Block], layers))

    @property
    def trunk_moe_index(self) -> dict[int, int]:
        """Layer index -> its position among the trunk's MoE layers (a routes tensor's layer axis, an expert-load
        row)."""
        kinds = self.cfg.layer_types
        return {i: m for m, i in enumerate(i for i, kind in enumerate(kinds) if kind == "moe")}

    def mtp_embeddings(self, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Embeddings of input_ids shifted left by k = 1..mtp_depths (what MTP depth k reads), whole sequences."""
        return [self.backbone.embeddings(shift_left(input_ids, k, 0)) for k in range(1, self.cfg.mtp_depths + 1)]

    # ----- MoE balancing -----------------------------------------------------------------------------------
    def moe_layers(self) -> list[LatentMoE]:
        """Every LatentMoE this model (or pipeline part) holds: trunk first, then the MTP block's."""
        return [moe for _, moe in self.moe_rows()]

    def moe_rows(self) -> list[tuple[int, LatentMoE]]:
        """(expert-load row, LatentMoE) of the MoE layers this model (or pipeline part) holds. Rows follow the
        whole model: trunk MoE layers in order, then the MTP block's (its routing at every depth summed)."""
        moe_index = self.trunk_moe_index
        rows = [(moe_index[i], cast(LatentMoE, block.mixer)) for i, block in self.numbered_layers() if i in moe_index]
        if self.mtp is not None:
            rows.append((len(moe_index), self.mtp.moe_layer.mixer))
        return rows

    @torch.no_grad()
    def update_expert_bias(self, global_load: torch.Tensor) -> None:
        """After an optimizer step: `bias += rate * sign(mean_load - load)` per MoE layer (SPEC section 3).

        `global_load` (n_moe_layers, E): token counts summed over the step's micro-batches and data-parallel ranks,
        one row per MoE layer of the whole model (`moe_rows`)."""
        rows = len(self.trunk_moe_index) + (self.cfg.mtp_depths > 0)
        if global_load.shape[0] != rows:
            raise ValueError(f"global_load has {global_load.shape[0]} rows for {rows} MoE layers")
        for row, layer in self.moe_rows():
            layer.update_bias(global_load[row], self.cfg.expert_bias_update_rate)
