"""Draft verification for the SSD recurrence: s tokens from a cached state, the state after any of them on demand.

A verify step feeds the pending token and k drafts, and afterwards keeps, per row, the state after its last
accepted token. :func:`ssd_update` with ``per_token_states`` materialises all s states (b, s, h, p, n) in a loop
over tokens: s full state tensors written and re-read per Mamba layer, then one is kept. Here nothing of state
size is built per token. With the cumulative log decay ``L_t = sum_{u<=t} dt_u A``:

    y_t = exp(L_t) <h_0, C_t> + sum_{u<=t} exp(L_t - L_u) (C_t . B_u) dt_u x_u + D x_t   (small (s, s) matrices)
    h_a = exp(L_a) h_0 + sum_{u<=a} exp(L_a - L_u) dt_u x_u (outer) B_u                  (one state per row)

so the step reads the entering state once, and :meth:`SSMTokenStates.select` builds only the state that is kept.
That form costs a fixed ~60 ops; for small states (few rows, small heads) the token loop's few ops per token cost
less, so below CLOSED_FORM_MIN_ELEMENTS the loop runs and its states are kept as they are (:class:`LoopTokenStates`,
same interface). Same shapes and dtypes as :func:`ssd_update`; computes in fp32 (fp64 when an input is fp64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentforge.kernels._dispatch import compute_dtype
from latentforge.kernels.ssd import _check_inputs, ssd_update

__all__ = ["CLOSED_FORM_MIN_ELEMENTS", "LoopTokenStates", "SSMTokenStates", "TokenStates", "ssd_verify"]

# the closed form from this many state elements per step (batch x tokens x heads x head_dim x state) on; measured on
# CPU, one thread, bench_generate's deep model (8K-element states per row): 8 rows x 4 tokens 0.42 ms against the
# loop's 0.47, 4 x 4 even, 1 x 4 0.24 against 0.19 (tokens' select included)
CLOSED_FORM_MIN_ELEMENTS = 1 << 18


@dataclass
class SSMTokenStates:
    """The SSM state after each of s tokens, kept as what it is computed from (module doc)."""

    initial: torch.Tensor  # (b, g, r, p, n) the state entering the tokens, compute dtype (not copied: read only)
    log_decay: torch.Tensor  # (b, s, g, r) cumulative L_t
    dtx: torch.Tensor  # (b, s, g, r, p) dt_u x_u
    B: torch.Tensor  # (b, s, g, n)
    dtype: torch.dtype  # the state's dtype

    def select(self, index: torch.Tensor) -> torch.Tensor:
        """The state after token index[row] of each row (b, h, p, n), in the state's dtype."""
        b, s, g, r = self.log_decay.shape
        rows = torch.arange(b, device=index.device)
        last = self.log_decay[rows, index]  # (b, g, r)
        upto = torch.arange(s, device=index.device)[None, :] <= index[:, None]  # (b, s): u <= a
        exponent = last[:, None] - self.log_decay  # (b, s, g, r); positive (and unused) where u > a
        weight = torch.exp(torch.where(upto[:, :, None, None], exponent, torch.full_like(exponent, float("-inf"))))
        # sum over u of weight * dtx_u (outer) B_u: (b, g, r*p, u) @ (b, g, u, n)
        p, n = self.dtx.shape[-1], self.B.shape[-1]
        weighted = (weight[..., None] * self.dtx).permute(0, 2, 3, 4, 1).reshape(b, g, r * p, s)
        inputs = (weighted @ self.B.transpose(1, 2)).view(b, g, r, p, n)
        state = torch.exp(last)[..., None, None] * self.initial + inputs
        return state.reshape(b, g * r, p, n).to(self.dtype)

    def all(self) -> torch.Tensor:
        """Every token's state (b, s, h, p, n): what ssd_update's per_token_states returns (tests, debugging)."""
        b, s = self.log_decay.shape[:2]
        states = [self.select(torch.full((b,), t, dtype=torch.long, device=self.B.device)) for t in range(s)]
        return torch.stack(states, dim=1)


@dataclass
class LoopTokenStates:
    """The states after each token as ssd_update's token loop built them (b, s, h, p, n)."""

    states: torch.Tensor

    def select(self, index: torch.Tensor) -> torch.Tensor:
        return self.states[torch.arange(index.shape[0], device=index.device), index]

    def all(self) -> torch.Tensor:
        return self.states


TokenStates = SSMTokenStates | LoopTokenStates


def ssd_verify(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    *,
    state: torch.Tensor,
) -> tuple[torch.Tensor, TokenStates]:
    """s new tokens of one document from ``state`` (b, h, p, n): y (b, s, h, p) in x.dtype and the states after each
    token (``select(index)`` / ``all()``), deferred for large states. ``state`` must stay unchanged until ``select``
    has been called."""
    _check_inputs(x, dt, A, B, C, D, 1, None, state, None)
    b, s, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if b * s * h * p * n < CLOSED_FORM_MIN_ELEMENTS:
        y, states = ssd_update(x, dt, A, B, C, D, state=state, per_token_states=True)
        return y, LoopTokenStates(states)
    r = h // g  # heads per group
    cdt = compute_dtype(x, dt, A, B, C, D, state)
    xs = x.to(cdt).view(b, s, g, r, p)
    dts = dt.to(cdt).view(b, s, g, r)
    log_decay = torch.cumsum(dts * A.to(cdt).view(g, r), dim=1)  # (b, s, g, r)
    dtx = dts[..., None] * xs  # (b, s, g, r, p)
    initial = state.to(cdt).view(b, g, r, p, n)
    Bg = B.to(cdt).transpose(1, 2).contiguous()  # (b, g, u, n)
    Ct = C.to(cdt).permute(0, 2, 3, 1).contiguous()  # (b, g, n, t)
    # batched matmuls in a (b, g, r, p, t) layout: contiguous operands, one copy into (b, t, h, p) at the end
    decay_t = log_decay.permute(0, 2, 3, 1)  # (b, g, r, t)
    # the entering state read through each token's C, decayed to the token: (b, g, r*p, n) @ (b, g, n, t)
    from_state = (initial.reshape(b, g, r * p, n) @ Ct).view(b, g, r, p, s) * torch.exp(decay_t)[..., None, :]
    # the tokens' own inputs: dt_u x_u (B_u . C_t) exp(L_t - L_u) summed over u <= t. Where u > t the exponent is
    # positive and may overflow to inf: triu_ replaces those entries (no multiply, so no inf * 0 = NaN)
    decay = torch.exp(decay_t[..., None, :] - decay_t[..., :, None]).triu_()  # (b, g, r, u, t)
    scores = (Bg @ Ct)[:, :, None] * decay  # (b, g, r, u, t)
    y = from_state + dtx.permute(0, 2, 3, 4, 1) @ scores  # (b, g, r, p, t)
    y = y.permute(0, 4, 1, 2, 3).contiguous()  # (b, t, g, r, p)
    if D is not None:
        y = y + D.to(cdt).view(g, r, 1) * xs
    return y.reshape(b, s, h, p).to(x.dtype), SSMTokenStates(initial, log_decay, dtx, B.to(cdt), state.dtype)
