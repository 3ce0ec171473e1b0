"""Decode steps of the kernels (a few tokens continuing from cached states) against the float64 loops of
kernel_naive: outputs, final states, and the state after every token (what draft rollback picks)."""

import pytest
import torch

from latentforge.kernels.conv1d import causal_conv1d_update
from latentforge.kernels.moe import moe_experts, moe_experts_dense, moe_experts_gathered
from latentforge.kernels.ssd import ssd_update
from tests.kernels.kernel_naive import conv1d_naive, moe_naive, ssd_naive
from tests.kernels.test_moe_ref import make_moe_inputs
from tests.kernels.test_ssd_ref import make_ssd_inputs


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("head,new", [(6, 1), (5, 4), (0, 3)])
def test_conv1d_update_continues_the_convolution(dtype, tol, head, new):
    gen = torch.Generator().manual_seed(head + new)
    b, c, k = 2, 6, 4
    x = torch.randn(b, head + new, c, generator=gen, dtype=torch.float64)
    weight = torch.randn(c, k, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    initial = torch.randn(b, c, k - 1, generator=gen, dtype=torch.float64)
    y_full, _ = conv1d_naive(x, weight, bias, initial_state=initial)
    _, state = conv1d_naive(x[:, :head], weight, bias, initial_state=initial) if head else (None, initial)
    cast = lambda t: t.to(dtype)  # noqa: E731
    y, per_token = causal_conv1d_update(
        cast(x[:, head:]), cast(weight), cast(bias), conv_state=cast(state), per_token_states=True
    )
    y_last, last = causal_conv1d_update(cast(x[:, head:]), cast(weight), cast(bias), conv_state=cast(state))
    assert y.dtype == dtype and per_token.shape == (b, new, c, k - 1)
    torch.testing.assert_close(y.double(), y_full[:, head:], rtol=tol, atol=tol)
    torch.testing.assert_close(y_last, y, rtol=0, atol=0)
    for t in range(new):
        _, after = conv1d_naive(x[:, : head + t + 1], weight, bias, initial_state=initial)
        torch.testing.assert_close(per_token[:, t].double(), after, rtol=tol, atol=tol)
    torch.testing.assert_close(last, per_token[:, -1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("head,new", [(7, 1), (3, 5)])
def test_ssd_update_continues_the_recurrence(dtype, tol, head, new):
    """Grouped heads (4 heads, 2 groups), D skip, a random state entering the sequence."""
    inputs = make_ssd_inputs(2, head + new, 4, 3, 2, 5, dtype=torch.float64, seed=head)
    x, dt, A, B, C, D, init = (inputs[key] for key in ("x", "dt", "A", "B", "C", "D", "init"))
    y_full, _ = ssd_naive(x, dt, A, B, C, D, initial_state=init)
    _, state = ssd_naive(x[:, :head], dt[:, :head], A, B[:, :head], C[:, :head], D, initial_state=init)
    tail = [t[:, head:].to(dtype) for t in (x, dt, B, C)]
    low = torch.float32 if dtype != torch.float64 else dtype  # A, D and the state stay fp32, as in the mixer
    y, per_token = ssd_update(
        tail[0], tail[1], A.to(low), tail[2], tail[3], D.to(low), state=state.to(low), per_token_states=True
    )
    y_last, last = ssd_update(tail[0], tail[1], A.to(low), tail[2], tail[3], D.to(low), state=state.to(low))
    assert y.dtype == dtype and per_token.shape == (2, new, 4, 3, 5) and per_token.dtype == low
    torch.testing.assert_close(y.double(), y_full[:, head:], rtol=tol, atol=tol)
    torch.testing.assert_close(y_last, y, rtol=0, atol=0)
    for t in range(new):
        end = head + t + 1
        _, after = ssd_naive(x[:, :end], dt[:, :end], A, B[:, :end], C[:, :end], D, initial_state=init)
        torch.testing.assert_close(per_token[:, t].double(), after, rtol=tol, atol=tol)
    torch.testing.assert_close(last, per_token[:, -1], rtol=0, atol=0)


def test_decode_steps_name_bad_states():
    with pytest.raises(ValueError, match="initial_state must be"):
        causal_conv1d_update(torch.zeros(1, 2, 6), torch.zeros(6, 4), conv_state=torch.zeros(1, 6, 4))
    inputs = make_ssd_inputs(1, 2, 4, 3, 2, 5)
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd_update(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], state=torch.zeros(1, 4, 3, 4))


@pytest.mark.parametrize("few_tokens", [moe_experts_dense, moe_experts_gathered])
def test_few_token_expert_paths_match_the_token_loop(few_tokens):
    x, idx, w, w_up, w_down = make_moe_inputs(5, 8, 12, 6, 2, seed=3)
    torch.testing.assert_close(
        few_tokens(x, idx, w, w_up, w_down), moe_naive(x, idx, w, w_up, w_down), rtol=0, atol=1e-12
    )
    replayed = idx.clone()
    replayed[:, 1] = replayed[:, 0]  # a replayed route may name one expert twice: both weights count
    torch.testing.assert_close(
        few_tokens(x, replayed, w, w_up, w_down), moe_naive(x, replayed, w, w_up, w_down), rtol=0, atol=1e-12
    )


def test_moe_experts_takes_the_few_token_paths_only_without_gradient(monkeypatch):
    import latentforge.kernels.moe as moe

    calls = []
    for name in ("moe_experts_dense", "moe_experts_gathered", "moe_permute"):
        original = getattr(moe, name)
        monkeypatch.setattr(moe, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x, idx, w, w_up, w_down = make_moe_inputs(4, 8, 12, 6, 2, seed=1)
    expected = moe_naive(x, idx, w, w_up, w_down)
    with torch.no_grad():
        torch.testing.assert_close(moe_experts(x, idx, w, w_up, w_down), expected, rtol=0, atol=1e-12)
        monkeypatch.setattr(moe, "DENSE_EXPERTS_MAX_MACS", 0)
        torch.testing.assert_close(moe_experts(x, idx, w, w_up, w_down), expected, rtol=0, atol=1e-12)
        monkeypatch.setattr(moe, "GATHER_EXPERTS_MAX_ELEMENTS", 0)
        torch.testing.assert_close(moe_experts(x, idx, w, w_up, w_down), expected, rtol=0, atol=1e-12)
    assert calls == ["moe_experts_dense", "moe_experts_gathered", "moe_permute"]
    calls.clear()
    monkeypatch.setattr(moe, "DENSE_EXPERTS_MAX_MACS", 1 << 24)
    w_up.requires_grad_(True)
    moe_experts(x, idx, w, w_up, w_down).sum().backward()  # training: the grouped path
    assert calls == ["moe_permute"] and w_up.grad is not None
    calls.clear()
    moe_experts(x, idx, w, w_up, w_down, linear_fn=lambda a, weight: a @ weight.t())  # precision emulation
    assert calls == ["moe_permute"]
