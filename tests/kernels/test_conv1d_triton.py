"""Triton causal conv1d against the reference (interpreter on CPU, native on GPU)."""

import pytest
import torch

from latentforge.kernels.conv1d import causal_conv1d_ref
from tests.kernels.test_conv1d_ref import make_conv_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def _check(shape, dtype, docs, with_init, activation, seed, device=DEVICE):
    from latentforge.kernels.conv1d_triton import causal_conv1d_triton

    b, l, c, k = shape
    t = make_conv_inputs(b, l, c, k, dtype=dtype, seed=seed, device=device)
    kw = dict(seq_idx=t["seq_idx"] if docs else None, activation=activation)
    leaves = {n: t[n].clone().requires_grad_() for n in ("x", "w", "bias", "init")}
    leaves_r = {n: t[n].clone().requires_grad_() for n in ("x", "w", "bias", "init")}
    y, f = causal_conv1d_triton(
        leaves["x"], leaves["w"], leaves["bias"], initial_state=leaves["init"] if with_init else None, **kw
    )
    y_r, f_r = causal_conv1d_ref(
        leaves_r["x"], leaves_r["w"], leaves_r["bias"], initial_state=leaves_r["init"] if with_init else None, **kw
    )
    torch.testing.assert_close(y, y_r, **TOL[dtype])
    torch.testing.assert_close(f, f_r, **TOL[dtype])
    gy, gf = torch.randn_like(y), torch.randn_like(f)
    ((y * gy).sum() + (f * gf).sum()).backward()
    ((y_r * gy).sum() + (f_r * gf).sum()).backward()
    for n in ("x", "w", "bias") + (("init",) if with_init else ()):
        scale = max(1.0, float(leaves_r[n].grad.abs().max()))  # dw / dbias sum over tokens
        torch.testing.assert_close(leaves[n].grad.float() / scale, leaves_r[n].grad.float() / scale, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,docs,with_init,activation",
    [
        ((2, 19, 5, 4), True, True, "silu"),
        ((1, 70, 3, 4), True, False, None),  # two time tiles
        ((1, 2, 3, 4), False, True, "silu"),  # shorter than the history
        ((2, 9, 4, 2), True, True, "silu"),
    ],
)
def test_conv1d_triton_matches_ref(shape, docs, with_init, activation, dtype):
    _check(shape, dtype, docs, with_init, activation, seed=shape[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_conv1d_triton_gpu_super_shape(dtype):
    _check((2, 4096, 8192 + 2 * 8 * 128, 4), dtype, True, True, "silu", seed=0, device="cuda")
