"""Triton softmax kernels of the chunked linear cross-entropy against the reference."""

import pytest
import torch

from latentforge.kernels.cross_entropy import linear_cross_entropy_ref
from tests.kernels.test_cross_entropy_ref import make_ce_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check(N, H, V, chunk, reduction, dtype, device=DEVICE, tol=1e-5):
    from latentforge.kernels.cross_entropy_triton import linear_cross_entropy_triton

    hidden, weight, labels = make_ce_inputs(N, H, V, dtype=dtype, seed=N + V, device=device)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = linear_cross_entropy_triton(h1, w1, labels, chunk_size=chunk, reduction=reduction)
    loss_r = linear_cross_entropy_ref(h2, w2, labels, chunk_size=chunk, reduction=reduction)
    torch.testing.assert_close(loss, loss_r, rtol=tol, atol=tol)
    g = torch.randn_like(loss_r)
    (loss * g).sum().backward()
    (loss_r * g).sum().backward()
    for a, b in ((h1.grad, h2.grad), (w1.grad, w2.grad)):
        assert a.dtype == b.dtype
        scale = float(b.abs().max())
        torch.testing.assert_close(a.float() / scale, b.float() / scale, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize(
    "N,H,V,chunk,reduction", [(13, 8, 50, 5, "mean"), (6, 4, 20, 16, "none"), (9, 8, 33, 4, "sum")]
)
def test_linear_ce_triton_fp32(N, H, V, chunk, reduction):
    _check(N, H, V, chunk, reduction, torch.float32)


def test_linear_ce_triton_fp16_multiple_vocab_blocks(monkeypatch):
    import latentforge.kernels.cross_entropy_triton as ce

    monkeypatch.setattr(ce, "_block_v", lambda V: 16)  # exercise the online logsumexp across vocab blocks
    _check(10, 8, 70, 4, "mean", torch.float16, tol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_ce_triton_gpu_vocab_131k(reduction):
    _check(4096 + 17, 1024, 131072, 2048, reduction, torch.bfloat16, device="cuda", tol=2e-2)
