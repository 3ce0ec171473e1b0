"""Chunked linear cross-entropy reference against a float64 per-token loop."""

import pytest
import torch

from tests.kernels.kernel_naive import cross_entropy_naive
from latentforge.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_ref


def make_ce_inputs(N, H, V, dtype=torch.float64, seed=0, device="cpu", n_ignored=3):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5 * 3
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[torch.randperm(N, generator=gen)[: min(n_ignored, N)]] = -100
    return hidden.to(device=device, dtype=dtype), weight.to(device=device, dtype=dtype), labels.to(device)


@pytest.mark.parametrize("N,H,V,chunk", [(17, 8, 50, 4), (5, 3, 7, 16), (32, 16, 300, 32)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_ce_ref_forward_and_grads_fp64(N, H, V, chunk, reduction):
    hidden, weight, labels = make_ce_inputs(N, H, V, seed=N + V)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy_ref(h1, w1, labels, chunk_size=chunk, reduction=reduction)
    loss_n = cross_entropy_naive(h2, w2, labels, reduction=reduction)
    torch.testing.assert_close(loss, loss_n, rtol=0, atol=1e-12)
    g = torch.randn_like(loss)
    (loss * g).sum().backward()
    (loss_n * g).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=0, atol=1e-12)


def test_linear_ce_all_ignored_is_zero_with_zero_grads():
    hidden, weight, labels = make_ce_inputs(4, 3, 5)
    labels[:] = -100
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy_ref(h, weight, labels)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(h.grad) == 0


def test_linear_ce_bf16_dispatcher_matches_fp32_torch():
    hidden, weight, labels = make_ce_inputs(24, 16, 100, dtype=torch.bfloat16, seed=5)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy(h, weight, labels, chunk_size=8)
    assert loss.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(hidden.float() @ weight.float().t(), labels, ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert h.grad.dtype == torch.bfloat16


def test_linear_ce_bad_reduction_raises():
    hidden, weight, labels = make_ce_inputs(4, 3, 5)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy_ref(hidden, weight, labels, reduction="avg")


def test_fp32_logits_under_autocast():
    """Under bf16 autocast the fused lm_head + CE still computes fp32 logits, forward and backward alike (autocast
    would otherwise round the forward's GEMM while the custom backward recomputes in fp32)."""
    import torch

    from latentforge.kernels.cross_entropy import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(64, 32, generator=g) * 4).requires_grad_()
    weight = (torch.randn(100, 32, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, 100, (64,), generator=g)
    loss = linear_cross_entropy(hidden, weight, labels, chunk_size=16, reduction="sum")
    loss.backward()
    expected = (loss.detach(), hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_size=16, reduction="sum")
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(hidden.grad, expected[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, expected[2], rtol=1e-5, atol=1e-6)
