"""Multi-token prediction (SPEC section 3): one physical `*E` block, applied at depths 1..D with shared weights.

Depth k reads the main model's embedding of the tokens shifted left by k and the previous depth's hidden state
(depth 0: the final-normed trunk output), and its output goes through the shared lm_head to predict token t+k+1.
Checkpoint layout: `mtp.layers.0.{enorm,hnorm,eh_proj,norm,mixer}` (attention) and
`mtp.layers.1.{norm,mixer,final_layernorm}` (LatentMoE).
"""

from typing import Iterable, Iterator, Optional, cast

import torch
from torch import nn

from .attention import Attention
from .config import ModelConfig
from .mixer_types import LayerState, MixerContext
from .moe import LatentMoE, Routing
from .norm import RMSNorm


class MTPAttentionLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.norm_eps)
        self.hnorm = RMSNorm(h, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.norm = RMSNorm(h, cfg.norm_eps)
        self.mixer = Attention(h, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)

    def forward(
        self,
        embedded: torch.Tensor,
        previous_hidden: torch.Tensor,
        seq_idx: Optional[torch.Tensor] = None,
        state: Optional[LayerState] = None,
        context: Optional[MixerContext] = None,
    ) -> torch.Tensor:
        u = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(previous_hidden)], dim=-1))
        return u + self.mixer(self.norm(u), seq_idx=seq_idx, state=state, context=context)


class MTPMoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mixer = LatentMoE(cfg)
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(
        self, u: torch.Tensor, seq_idx: Optional[torch.Tensor] = None, context: Optional[MixerContext] = None
    ) -> tuple[torch.Tensor, Routing]:
        y, routing = self.mixer(self.norm(u), seq_idx=seq_idx, context=context)
        return self.final_layernorm(u + y), routing


class MTPBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MTPAttentionLayer(cfg), MTPMoELayer(cfg)])

    def forward(
        self,
        embedded: torch.Tensor,
        previous_hidden: torch.Tensor,
        seq_idx: Optional[torch.Tensor] = None,
        state: Optional[LayerState] = None,
        context: Optional[MixerContext] = None,
    ) -> tuple[torch.Tensor, Routing]:
        """One depth: (embedding of the shifted tokens, h_{k-1}) -> (h_k, ready for the shared lm_head, the MoE
        layer's Routing)."""
        u = self.attention_layer(embedded, previous_hidden, seq_idx=seq_idx, state=state, context=context)
        return self.moe_layer(u, seq_idx=seq_idx, context=context)

    # nn.ModuleList indexes as Module in torch's stubs; the layers' types are fixed by __init__
    @property
    def attention_layer(self) -> MTPAttentionLayer:
        return cast(MTPAttentionLayer, self.layers[0])

    @property
    def moe_layer(self) -> MTPMoELayer:
        return cast(MTPMoELayer, self.layers[1])

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        first, second = self.attention_layer, self.moe_layer
        for norm in (first.enorm, first.hnorm, first.norm, second.norm, second.final_layernorm):
            norm.init_weights()
        nn.init.normal_(first.eh_proj.weight, std=std)
        first.mixer.init_weights(std, out_std)
        second.mixer.init_weights(std, out_std)


def mtp_recursion(
    mtp: MTPBlock,
    embeddings: Iterable[torch.Tensor],
    hidden: torch.Tensor,
    seq_idx: Optional[torch.Tensor] = None,
    context: Optional[MixerContext] = None,
    detach: bool = False,
) -> Iterator[tuple[torch.Tensor, Routing]]:
    """The MTP recursion, once for every caller: yields (h_k, Routing) for depth k = 1, 2, ...

    `embeddings[k-1]`: the embedding of the tokens shifted left by k (position t reads token t+k), `hidden`: the
    final-normed trunk output h_0; depth k reads h_{k-1}. `detach`: the block trains on detached inputs (the
    trunk and the shared embedding get no gradient from it; RL keeps the drafter up to date this way)."""
    previous = hidden.detach() if detach else hidden
    for embedded in embeddings:
        previous, routing = mtp(embedded.detach() if detach else embedded, previous, seq_idx=seq_idx, context=context)
        yield previous, routing


def shift_left(t: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    """t[:, i] <- t[:, i + k]; the last k positions get `fill`."""
    out = torch.full_like(t, fill)
    out[:, :-k] = t[:, k:]
    return out
