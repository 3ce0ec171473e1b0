"""The hybrid stack run over slot rows with their states: prefill, decode / verify steps, the MTP block per depth.

The layer loop is the model's own (`x = x + mixer(norm(x))`, final norm, lm_head) with the states of the engine's
slots. Prefill uses the mixers' chunked path; steps hand the Mamba mixers a decode state (model/mamba.py: the
token-by-token recurrence of kernels/), which can keep the state after every fed token so that a verify step is
rolled back by `commit(index)` choosing, per row, the state after its last accepted token. Attention needs no rollback: the keys of rejected tokens sit beyond the row's
length, are masked by position and are overwritten by the next step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .layers import moe_inference
from .state import MambaStates, SlotStates


@dataclass
class StepOutput:
    logits: torch.Tensor  # (n, s, V)
    hidden: torch.Tensor  # (n, s, H) final-normed (the lm_head input, what MTP depth 1 reads)
    mamba: list  # per layer: MambaStates (per position) or None, until commit()
    routes: Optional[torch.Tensor] = None  # (n, s, trunk MoE layers, top_k) expert ids, when recording routes


class ModelRunner:
    def __init__(self, model, states: SlotStates, record_routes: bool = False):
        self.model = model
        self.states = states
        self.blocks = list(model.backbone.layers)
        self.record_routes = record_routes
        self.prefill_routes: Optional[torch.Tensor] = None

    def _ffn(self, block, h, routes: Optional[list]):
        if block.kind == "moe":
            return moe_inference(block.mixer, h, routes)
        return block.mixer(h)

    def _new_routes(self) -> Optional[list]:
        return [] if self.record_routes else None

    @staticmethod
    def _stack_routes(routes: Optional[list], n: int, s: int) -> Optional[torch.Tensor]:
        """Per MoE layer (n*s, top_k) -> (n, s, layers, top_k); None when not recording or no MoE layer."""
        if not routes:
            return None
        return torch.stack([r.view(n, s, -1) for r in routes], dim=2)

    @torch.no_grad()
    def prefill(self, row: int, ids: torch.Tensor):
        """Run a fresh sequence ids (1, L) into slot `row`.

        Returns (logits of the last token (1, V), hidden (1, L, H)); with record_routes, the trunk MoE layers'
        expert ids (1, L, layers, top_k) are left in `self.prefill_routes`."""
        length = ids.shape[1]
        self.states.check_fits(length)
        self.states.reset_row(row)
        rows = slice(row, row + 1)
        pos = torch.zeros(1, dtype=torch.long, device=ids.device)
        x = self.model.backbone.embeddings(ids)
        routes = self._new_routes()
        for block, state in zip(self.blocks, self.states.layers):
            h = block.norm(x)
            if block.kind == "attention":
                y = block.mixer(h, state=SlotStates.attention_view(state, rows, length, pos))
            elif block.kind == "mamba":
                scan_state = {"conv": state["conv"][rows], "ssm": state["ssm"][rows]}
                y = block.mixer(h, state=scan_state)  # chunked scan; replaces the dict's entries by final states
                state["conv"][rows] = scan_state["conv"]
                state["ssm"][rows] = scan_state["ssm"]
            else:
                y = self._ffn(block, h, routes)
            x = x + y
        hidden = self.model.backbone.norm_f(x)
        self.prefill_routes = self._stack_routes(routes, 1, length)
        return self.model.lm_head(hidden[:, -1]), hidden

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: torch.Tensor, max_pos: int, keep_positions: bool) -> StepOutput:
        """Feed ids (n, s) to slot rows 0..n-1, whose sequences hold `pos` (n,) tokens (max_pos = max of pos).

        Without keep_positions the Mamba states advance past all s tokens now; with it they stay put until
        `commit(out, index)` picks the state after token index[row] of each row."""
        n, s = ids.shape
        length = max_pos + s
        self.states.check_fits(length)
        rows = slice(0, n)
        x = self.model.backbone.embeddings(ids)
        pending = []
        routes = self._new_routes()
        for block, state in zip(self.blocks, self.states.layers):
            h = block.norm(x)
            if block.kind == "attention":
                y = block.mixer(h, state=SlotStates.attention_view(state, rows, length, pos))
                pending.append(None)
            elif block.kind == "mamba":
                decode = {"conv": state["conv"][rows], "ssm": state["ssm"][rows], "recurrent": True,
                          "keep_per_token": keep_positions}
                y = block.mixer(h, state=decode)
                if keep_positions:
                    pending.append(MambaStates(decode["conv_per_token"], decode["ssm_per_token"]))
                else:
                    self._write_mamba(state, n, decode["conv"], decode["ssm"])
                    pending.append(None)
            else:
                y = self._ffn(block, h, routes)
                pending.append(None)
            x = x + y
        hidden = self.model.backbone.norm_f(x)
        return StepOutput(self.model.lm_head(hidden), hidden, pending, self._stack_routes(routes, n, s))

    def commit(self, out: StepOutput, index: torch.Tensor):
        """Keep, per row, the Mamba/conv states after fed token index[row] (the last accepted one)."""
        for state, new in zip(self.states.layers, out.mamba):
            if new is not None:
                self._write_mamba(state, index.shape[0], *new.select(index))
        out.mamba = [None] * len(out.mamba)

    @staticmethod
    def _write_mamba(state: dict, n: int, conv: torch.Tensor, ssm: torch.Tensor):
        state["conv"][:n] = conv
        state["ssm"][:n] = ssm

    @torch.no_grad()
    def mtp_depth(self, depth: int, rows: slice, tokens: torch.Tensor, previous: torch.Tensor,
                  start: torch.Tensor, max_start: int, last: torch.Tensor):
        """The shared MTP block at drafting depth `depth` (1-based, own KV cache) over slot rows `rows`.

        tokens (m, c): the tokens shifted by `depth` (position s reads token s+depth); previous (m, c, H): the
        depth-1 hidden states (the trunk's at depth 1); start (m,): the position of column 0 per row.
        Returns (hidden (m, c, H), logits (m, V) at column last[row])."""
        m, c = tokens.shape
        length = max_start + c
        self.states.check_fits(length)
        attention_layer, moe_layer = self.model.mtp.layers
        embedded = self.model.backbone.embeddings(tokens)
        view = SlotStates.attention_view(self.states.mtp[depth - 1], rows, length, start)
        u = attention_layer(embedded, previous, state=view)
        hidden = moe_layer.final_layernorm(u + moe_inference(moe_layer.mixer, moe_layer.norm(u)))
        picked = hidden[torch.arange(m, device=hidden.device), last]
        return hidden, self.model.lm_head(picked)
