"""Triton RMSNorm kernels against the reference (interpreter on CPU, native on GPU)."""

import pytest
import torch

from latentforge.kernels.rmsnorm import gated_rms_norm_ref, rms_norm_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def _compare(fn_fast, fn_ref, inputs, dtype):
    a = [t.clone().requires_grad_() for t in inputs]
    b = [t.clone().requires_grad_() for t in inputs]
    out_fast, out_ref = fn_fast(*a), fn_ref(*b)
    assert out_fast.dtype == out_ref.dtype
    torch.testing.assert_close(out_fast, out_ref, **TOL[dtype])
    g = torch.randn_like(out_ref)
    out_fast.backward(g)
    out_ref.backward(g)
    for ta, tb in zip(a, b):
        # dw sums over rows: compare relative to its scale
        torch.testing.assert_close(ta.grad.float(), tb.grad.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,group", [((2, 3, 24), 8), ((5, 20), 20), ((3, 12), 3)])
def test_gated_rms_norm_triton(shape, group, dtype):
    from latentforge.kernels.rmsnorm_triton import gated_rms_norm_triton

    gen = torch.Generator().manual_seed(group)
    x, z = (torch.randn(*shape, generator=gen).to(DEVICE, dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(shape[-1], generator=gen)).to(DEVICE)
    _compare(
        lambda a, b, c: gated_rms_norm_triton(a, b, c, group),
        lambda a, b, c: gated_rms_norm_ref(a, b, c, group),
        [x, z, w],
        dtype,
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_triton(dtype):
    from latentforge.kernels.rmsnorm_triton import rms_norm_triton

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 33, generator=gen).to(DEVICE, dtype)
    w = torch.randn(33, generator=gen).to(DEVICE)
    _compare(rms_norm_triton, rms_norm_ref, [x, w], dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gated_rms_norm_triton_gpu_sizes(dtype):
    from latentforge.kernels.rmsnorm import gated_rms_norm

    x, z = (torch.randn(2, 4096, 8192, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.randn(8192, device="cuda")
    _compare(
        lambda a, b, c: gated_rms_norm(a, b, c, 1024),
        lambda a, b, c: gated_rms_norm_ref(a, b, c, 1024),
        [x, z, w],
        dtype,
    )
