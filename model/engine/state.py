"""Per-slot inference state: a KV cache per attention layer, conv + SSM state per Mamba layer, and a KV cache per
MTP drafting depth, for a fixed number of slots (rows) of a fixed capacity (tokens).

The layer dicts follow the layout the model's mixers read (model/attention.py, model/mamba.py): attention
{"k", "v": (slots, kv_heads, capacity, head_dim), "pos"}, Mamba {"conv": (slots, conv_dim, K-1), "ssm": (slots,
heads, head_dim, state)}. The
SSM state is fp32 (fp64 for an fp64 model, so exactness tests are not limited by the state's rounding).
Sequence lengths are not stored here: the engine passes each call's positions (`pos`) itself, so every attention
layer sees the same per-row positions and nothing needs writing back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from latentforge.kernels.ssd_verify import TokenStates


@dataclass
class MambaStates:
    """A Mamba layer's states after each token of a verify step: conv (n, s, c, K-1), ssm deferred (only the kept
    one is built)."""

    conv: torch.Tensor
    ssm: TokenStates

    def select(self, index: torch.Tensor) -> tuple:
        """(conv, ssm) after token index[row] of each row: the row's last accepted token."""
        rows = torch.arange(index.shape[0], device=index.device)
        return self.conv[rows, index], self.ssm.select(index)


@dataclass
class RowSnapshot:
    """The main-model state of one row after `length` tokens (for prefix reuse). Tensors have batch dim 1."""

    length: int
    layers: list  # per layer: None, {"k", "v"} cut to `length`, or {"conv", "ssm"}


class SlotStates:
    def __init__(self, model, num_slots: int, capacity: int, draft_depths: int = 0):
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.state_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.num_slots, self.capacity = num_slots, capacity
        self.kinds = [block.kind for block in model.backbone.layers]
        self.layers = [self._allocate(block.kind, block.mixer) for block in model.backbone.layers]
        self.mtp = []
        if draft_depths:
            attention = model.mtp.layers[0].mixer
            self.mtp = [self._kv_cache(attention) for _ in range(draft_depths)]

    def _kv_cache(self, attention) -> dict:
        kv_heads = attention.k_proj.weight.shape[0] // attention.head_dim
        shape = (self.num_slots, kv_heads, self.capacity, attention.head_dim)
        return {
            "k": torch.zeros(shape, dtype=self.dtype, device=self.device),
            "v": torch.zeros(shape, dtype=self.dtype, device=self.device),
        }

    def _allocate(self, kind, mixer) -> Optional[dict]:
        n = self.num_slots
        if kind == "attention":
            return self._kv_cache(mixer)
        if kind == "mamba":
            conv_dim, _, width = mixer.conv1d.weight.shape
            heads = mixer.dt_bias.shape[0]
            return {
                "conv": torch.zeros(n, conv_dim, width - 1, dtype=self.dtype, device=self.device),
                "ssm": torch.zeros(
                    n, heads, mixer.head_dim, mixer.state_size, dtype=self.state_dtype, device=self.device
                ),
            }
        return None

    # ----- views handed to the layers ------------------------------------------------------------------------
    @staticmethod
    def attention_view(state: dict, rows: slice, length: int, pos: torch.Tensor) -> dict:
        """Basic slicing only, so the mixer's in-place writes of new keys/values land in the slot tensors."""
        return {"k": state["k"][rows, :, :length], "v": state["v"][rows, :, :length], "pos": pos}

    def check_fits(self, length: int):
        if length > self.capacity:
            raise RuntimeError(f"engine cache overflow: {length} positions needed, capacity {self.capacity}")

    # ----- row management (continuous batching) ---------------------------------------------------------------
    def reset_row(self, row: int):
        """A new sequence starts from zero conv/SSM state (stale keys are masked by position, no need to clear)."""
        for state in self.layers:
            if state is not None and "ssm" in state:
                state["conv"][row].zero_()
                state["ssm"][row].zero_()

    def move_row(self, src: int, dst: int, length: int, mtp_lengths=()):
        """Copy row `src` into row `dst`: main states up to `length` tokens, MTP caches up to their lengths."""
        for state in self.layers:
            if state is None:
                continue
            if "k" in state:
                state["k"][dst, :, :length] = state["k"][src, :, :length]
                state["v"][dst, :, :length] = state["v"][src, :, :length]
            else:
                state["conv"][dst] = state["conv"][src]
                state["ssm"][dst] = state["ssm"][src]
        for state, mtp_length in zip(self.mtp, mtp_lengths):
            state["k"][dst, :, :mtp_length] = state["k"][src, :, :mtp_length]
            state["v"][dst, :, :mtp_length] = state["v"][src, :, :mtp_length]

    def snapshot_row(self, row: int, length: int) -> RowSnapshot:
        layers = []
        for state in self.layers:
            if state is None:
                layers.append(None)
            elif "k" in state:
                layers.append({key: state[key][row : row + 1, :, :length].clone() for key in ("k", "v")})
            else:
                layers.append({key: state[key][row : row + 1].clone() for key in ("conv", "ssm")})
        return RowSnapshot(length, layers)

    def load_row(self, row: int, snapshot: RowSnapshot):
        for state, saved in zip(self.layers, snapshot.layers):
            if state is None:
                continue
            if "k" in state:
                state["k"][row : row + 1, :, : snapshot.length] = saved["k"]
                state["v"][row : row + 1, :, : snapshot.length] = saved["v"]
            else:
                state["conv"][row : row + 1] = saved["conv"]
                state["ssm"][row : row + 1] = saved["ssm"]
