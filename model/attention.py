"""Causal grouped-query attention with no positional encoding, no QK-norm and no biases (SPEC section 1).

`seq_idx` (b, s) confines attention to the token's own document. `state` (inference only) is a dict
{"k": (b, g, T, d), "v": (b, g, T, d), "pos": (b,) long}: the new tokens' keys/values are written at `pos`
and the queries attend to everything cached before them; `pos` advances by the number of new tokens.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .mixer_types import LayerState, MixerContext


def document_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, s) document ids -> (b, 1, s, s) bool: True where query i may attend key j."""
    s = seq_idx.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=seq_idx.device).tril()
    same_doc = seq_idx[:, :, None] == seq_idx[:, None, :]
    return (causal & same_doc)[:, None]


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        seq_idx: Optional[torch.Tensor] = None,
        state: Optional[LayerState] = None,
        context: Optional[MixerContext] = None,
    ) -> torch.Tensor:
        """x (b, s, H) -> (b, s, H). `state`: cached decoding (module doc). `context`: context parallelism (a
        train.parallel object): this rank's queries attend to the keys/values of every rank's chunks."""
        q, k, v = self.project(x)
        if state is not None:
            out = self._attend_cached(q, k, v, state)
        elif context is not None:
            out = context.attention(q, k, v)
        elif seq_idx is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(seq_idx), enable_gqa=True)
        return self.output(out)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (b, heads, s, d), k and v (b, kv_heads, s, d). Head counts come from the weights, so a
        tensor-parallel shard (fewer heads) runs the same code."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        return q, k, v

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """(b, heads, s, d) attention output -> o_proj."""
        b, _, s, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    @staticmethod
    def _attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: LayerState) -> torch.Tensor:
        b, _, s, _ = q.shape
        pos = state["pos"]
        rows = torch.arange(b, device=q.device)[:, None]
        cols = pos[:, None] + torch.arange(s, device=q.device)[None, :]
        state["k"][rows, :, cols] = k.transpose(1, 2).to(state["k"].dtype)
        state["v"][rows, :, cols] = v.transpose(1, 2).to(state["v"].dtype)
        total = state["k"].shape[2]
        key_pos = torch.arange(total, device=q.device)
        mask = key_pos[None, None, :] <= cols[:, :, None]  # (b, s, T)
        out = F.scaled_dot_product_attention(
            q, state["k"].to(q.dtype), state["v"].to(q.dtype), attn_mask=mask[:, None], enable_gqa=True
        )
        state["pos"] = pos + s
        return out

    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=out_std)
