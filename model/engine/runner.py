"""The model run over slot rows with their states: prefill, decode / verify steps, the MTP block per depth.

Every call is the model's own forward (`HybridModel.forward(ids, cache=...)`, `MTPBlock.forward(..., state=...)`)
with a cache whose `layers[i]` is a view of layer i's slot state. Prefill hands the Mamba mixers their chunked
path; steps hand them a decode state (model/mamba.py: the token-by-token recurrence of kernels/), which can keep
the state after every fed token so that a verify step is rolled back by `commit(index)` choosing, per row, the
state after its last accepted token. Attention needs no rollback: the keys of rejected tokens sit beyond the
row's length, are masked by position and are overwritten by the next step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from .state import MambaStates, SlotStates

if TYPE_CHECKING:
    from ..hybrid import HybridModel


# prompts up to this long are prefilled together (`prefill_rows`: one forward for the rows joining in a step); the
# decode path it takes builds (s, s) decay matrices per row and head, so longer ones take the chunked scan alone
BATCHED_PREFILL_MAX_TOKENS = 256


@dataclass
class StepOutput:
    logits: torch.Tensor  # (n, s, V)
    hidden: torch.Tensor  # (n, s, H) final-normed (the lm_head input, what MTP depth 1 reads)
    mamba: list  # per layer: MambaStates (per position) or None, until commit()
    routes: Optional[torch.Tensor] = None  # (n, s, trunk MoE layers, top_k) expert ids, when recording routes


@dataclass
class ForwardCache:
    """What `HybridModel.forward(cache=...)` reads: layers[i] is layer i's state (None for stateless layers)."""

    layers: list


class ModelRunner:
    def __init__(
        self, model: "HybridModel", states: SlotStates, record_routes: bool = False, compile: bool = False
    ) -> None:
        self.model = model
        self.states = states
        self.record_routes = record_routes
        self.prefill_routes: Optional[torch.Tensor] = None
        # what the decode / verify steps call: the model itself, or (EngineConfig.compile) torch.compile's wrapper
        # of it, which runs the same forward and leaves the model object as it is (training may share it)
        self.step_forward = model
        if compile:
            from latentforge.data.config import use_persistent_compile_cache

            use_persistent_compile_cache()
            # dynamic: the rows, the fed tokens and the cache length change from step to step
            self.step_forward = torch.compile(model, dynamic=True)

    def _cache(
        self, rows: slice, length: int, pos: torch.Tensor, recurrent: bool, keep_per_token: bool = False
    ) -> ForwardCache:
        """Views of the slot states of `rows`: attention keys/values up to `length` written at `pos`, Mamba states
        (a decode state when `recurrent`)."""
        layers = []
        for state in self.states.layers:
            if state is None:
                layers.append(None)
            elif "k" in state:
                layers.append(SlotStates.attention_view(state, rows, length, pos))
            else:
                view: dict = {"conv": state["conv"][rows], "ssm": state["ssm"][rows]}
                if recurrent:
                    view.update(recurrent=True, keep_per_token=keep_per_token)
                layers.append(view)
        return ForwardCache(layers)

    def _write_back(self, cache: ForwardCache, rows: slice) -> None:
        """The Mamba states the mixers left in the cache (their states after the last token) into the slots."""
        for state, view in zip(self.states.layers, cache.layers):
            if state is not None and "ssm" in state:
                state["conv"][rows] = view["conv"]
                state["ssm"][rows] = view["ssm"]

    @torch.no_grad()
    def prefill(self, row: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a fresh sequence ids (1, L) into slot `row`.

        Returns (logits of the last token (1, V), hidden (1, L, H)); with record_routes, the trunk MoE layers'
        expert ids (1, L, layers, top_k) are left in `self.prefill_routes`."""
        length = ids.shape[1]
        self.states.check_fits(length)
        self.states.reset_row(row)
        rows = slice(row, row + 1)
        cache = self._cache(rows, length, torch.zeros(1, dtype=torch.long, device=ids.device), recurrent=False)
        out = self.model(ids, cache=cache, with_logits=False)  # the chunked scan; logits of the last token only
        self._write_back(cache, rows)
        self.prefill_routes = out.routes if self.record_routes else None
        return self.model.lm_head(out.hidden[:, -1]), out.hidden

    @torch.no_grad()
    def prefill_rows(self, lo: int, prompts: list) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Run fresh sequences `prompts` (lists of ids) into slot rows lo, lo+1, ... in one forward.

        The rows are right-padded to the longest and fed through the decode path that verify steps use, keeping
        each Mamba state after the row's own last token (`commit`); the pads' attention keys sit beyond the row's
        length (masked by position, overwritten later). Returns (logits of each row's last token (m, V), hidden
        (m, L, H) right-padded, the trunk MoE routes (m, L, layers, top_k) or None)."""
        m, longest = len(prompts), max(map(len, prompts))
        self.states.check_fits(longest)
        device = self.model.lm_head.weight.device
        for row in range(lo, lo + m):
            self.states.reset_row(row)
        ids = torch.tensor([p + [p[-1]] * (longest - len(p)) for p in prompts], dtype=torch.long, device=device)
        last = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long, device=device)
        rows = slice(lo, lo + m)
        cache = self._cache(rows, longest, torch.zeros(m, dtype=torch.long, device=device), True, True)
        out = self.model(ids, cache=cache, with_logits=False)  # logits of the last tokens only, below
        self.commit(StepOutput(out.hidden, out.hidden, self._pending(cache)), last, lo=lo)
        logits = self.model.lm_head(out.hidden[torch.arange(m, device=device), last])
        return logits, out.hidden, out.routes if self.record_routes else None

    @torch.no_grad()
    def step(self, ids: torch.Tensor, pos: torch.Tensor, max_pos: int, keep_positions: bool) -> StepOutput:
        """Feed ids (n, s) to slot rows 0..n-1, whose sequences hold `pos` (n,) tokens (max_pos = max of pos).

        Without keep_positions the Mamba states advance past all s tokens now; with it they stay put until
        `commit(out, index)` picks the state after token index[row] of each row."""
        n, s = ids.shape
        length = max_pos + s
        self.states.check_fits(length)
        rows = slice(0, n)
        cache = self._cache(rows, length, pos, recurrent=True, keep_per_token=keep_positions)
        out = self.step_forward(ids, cache=cache)
        if keep_positions:
            pending = self._pending(cache)
        else:
            self._write_back(cache, rows)
            pending = [None] * len(cache.layers)
        return StepOutput(out.logits, out.hidden, pending, out.routes if self.record_routes else None)

    @staticmethod
    def _pending(cache: ForwardCache) -> list:
        """Per layer, the Mamba states a keep_per_token forward left in the cache (None for other layers)."""
        return [
            None
            if view is None or "ssm_per_token" not in view
            else MambaStates(view["conv_per_token"], view["ssm_per_token"])
            for view in cache.layers
        ]

    def commit(self, out: StepOutput, index: torch.Tensor, lo: int = 0) -> None:
        """Keep, per row lo+i, the Mamba/conv states after fed token index[i] (the last accepted one)."""
        rows = slice(lo, lo + index.shape[0])
        for state, new in zip(self.states.layers, out.mamba):
            if state is not None and new is not None:
                state["conv"][rows], state["ssm"][rows] = new.select(index)
        out.mamba = [None] * len(out.mamba)

    @torch.no_grad()
    def mtp_depth(
        self,
        depth: int,
        rows: slice,
        tokens: torch.Tensor,
        previous: torch.Tensor,
        start: torch.Tensor,
        max_start: int,
        last: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's MTP block at drafting depth `depth` (1-based, own KV cache) over slot rows `rows`.

        tokens (m, c): the tokens shifted by `depth` (position s reads token s+depth); previous (m, c, H): the
        depth-1 hidden states (the trunk's at depth 1); start (m,): the position of column 0 per row.
        Returns (hidden (m, c, H), logits (m, V) at column last[row])."""
        m, c = tokens.shape
        length = max_start + c
        self.states.check_fits(length)
        view = SlotStates.attention_view(self.states.mtp[depth - 1], rows, length, start)
        assert self.model.mtp is not None, "drafting needs the model's MTP block"
        hidden, _ = self.model.mtp(self.model.backbone.embeddings(tokens), previous, state=view)
        picked = hidden[torch.arange(m, device=hidden.device), last]
        return hidden, self.model.lm_head(picked)
