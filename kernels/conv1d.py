"""Causal depthwise conv1d + bias + SiLU over (batch, seqlen, channels), with document resets.

    y[t, c] = act(bias[c] + sum_i weight[c, i] * in[t - (k-1) + i])

``in`` at negative times comes from ``initial_state`` (b, c, k-1) (zeros when None); an input from an
earlier document than token t counts as zero (``seq_idx``). The initial state belongs to the row's first
document. ``final_state`` holds the last k-1 inputs (pre-activation), with inputs of documents other than
the last token's zeroed, so decoding the last document continues exactly. (A caller chaining states across
context-parallel ranks must zero the state itself when the next rank starts a new document.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentforge.kernels._dispatch import compute_dtype, use_triton

__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update"]


def _check_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seq_idx: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    activation: str | None,
) -> None:
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, seqlen, channels), got shape {tuple(x.shape)}")
    b, l, c = x.shape
    if weight.dim() != 2 or weight.shape[0] != c:
        raise ValueError(
            f"causal_conv1d: weight must be (channels, width) with channels = {c}, got {tuple(weight.shape)} "
            "(an nn.Conv1d weight (c, 1, k) needs .squeeze(1))"
        )
    k = weight.shape[1]
    if bias is not None and bias.shape != (c,):
        raise ValueError(f"causal_conv1d: bias must be (channels,) = ({c},), got {tuple(bias.shape)}")
    if seq_idx is not None and seq_idx.shape != (b, l):
        raise ValueError(f"causal_conv1d: seq_idx must be (batch, seqlen) = {(b, l)}, got {tuple(seq_idx.shape)}")
    if initial_state is not None and initial_state.shape != (b, c, k - 1):
        raise ValueError(
            f"causal_conv1d: initial_state must be (batch, channels, width-1) = {(b, c, k - 1)}, "
            f"got {tuple(initial_state.shape)}"
        )
    if activation not in ("silu", None):
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}")


def causal_conv1d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure PyTorch, differentiable by autograd; fp32 compute. Returns (y in x.dtype, final_state in x.dtype)."""
    _check_inputs(x, weight, bias, seq_idx, initial_state, activation)
    b, l, c = x.shape
    k = weight.shape[1]
    cdt = compute_dtype(x, weight, bias, initial_state)
    if initial_state is None:
        history = torch.zeros(b, k - 1, c, dtype=cdt, device=x.device)
    else:
        history = initial_state.to(cdt).transpose(1, 2)
    full = torch.cat([history, x.to(cdt)], dim=1)  # (b, k-1+l, c): full[:, k-1+t] = x[:, t]
    w = weight.to(cdt)
    if seq_idx is None:
        doc = None
    else:
        doc = seq_idx.long()
        doc_full = torch.cat([doc[:, :1].expand(b, k - 1), doc], dim=1)

    # one shifted multiply-add per tap (k is 4): vectorised over time, no loop over tokens
    acc = torch.zeros(b, l, c, dtype=cdt, device=x.device)
    for i in range(k):
        tap = full[:, i : i + l] * w[:, i]
        if doc is not None:
            tap = tap * (doc_full[:, i : i + l] == doc).unsqueeze(-1)
        acc = acc + tap
    if bias is not None:
        acc = acc + bias.to(cdt)
    y = F.silu(acc) if activation == "silu" else acc

    final = full[:, l:]  # the last k-1 inputs
    if doc is not None:
        final = final * (doc_full[:, l:] == doc[:, -1:]).unsqueeze(-1)
    return y.to(x.dtype), final.transpose(1, 2).to(x.dtype)


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seq_idx: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv1d (+ bias, + SiLU): Triton on CUDA tensors, else :func:`causal_conv1d_ref`."""
    if use_triton(x, weight):
        from latentforge.kernels.conv1d_triton import causal_conv1d_triton

        _check_inputs(x, weight, bias, seq_idx, initial_state, activation)
        return causal_conv1d_triton(
            x, weight, bias, seq_idx=seq_idx, initial_state=initial_state, activation=activation
        )
    return causal_conv1d_ref(x, weight, bias, seq_idx=seq_idx, initial_state=initial_state, activation=activation)


def causal_conv1d_update(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    conv_state: torch.Tensor,
    activation: str | None = "silu",
    per_token_states: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode step: the conv of s new inputs x (b, s, c) of one document, continuing from ``conv_state``.

    ``conv_state`` (b, c, k-1): the last k-1 inputs before x (pre-activation, as ``causal_conv1d`` returns it).
    Returns (y (b, s, c) in x.dtype, states in conv_state's dtype): the state after the last input (b, c, k-1), or
    with ``per_token_states`` the state after each input (b, s, c, k-1), so that a rejected draft rolls back by
    picking one. Computes in fp32 (fp64 for fp64 inputs), in one windowed product: no loop over tokens.
    """
    _check_inputs(x, weight, bias, None, conv_state, activation)
    s, k = x.shape[1], weight.shape[1]
    cdt = compute_dtype(x, weight, bias, conv_state)
    history = torch.cat([conv_state.transpose(1, 2).to(x.dtype), x], dim=1)  # (b, k-1+s, c)
    windows = history.unfold(1, k, 1)  # (b, s, c, k): the inputs token t's output reads
    acc = (windows.to(cdt) * weight.to(cdt)).sum(-1)
    if bias is not None:
        acc = acc + bias.to(cdt)
    y = F.silu(acc) if activation == "silu" else acc
    if per_token_states:
        states = history.unfold(1, k - 1, 1)[:, 1:]  # (b, s, c, k-1): the k-1 inputs ending at each token
    else:
        states = history[:, s:].transpose(1, 2)
    return y.to(x.dtype), states.to(conv_state.dtype)
