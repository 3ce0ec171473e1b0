"""Triton SSD scan (forward and backward) against ssd_scan_ref (interpreter on CPU, native on GPU)."""

import pytest
import torch

from latentforge.kernels.ssd import ssd_scan_ref
from tests.kernels.test_ssd_ref import make_ssd_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=5e-2, atol=5e-2),
}
NAMES = ("x", "dt", "A", "B", "C", "D", "init", "z")


def _check(shape, dtype, docs, with_init, with_z=False, with_d=True, seed=0, device=DEVICE, seq_idx=None):
    from latentforge.kernels.ssd_triton import ssd_scan_triton

    b, l, h, p, g, n, q = shape
    t = make_ssd_inputs(b, l, h, p, g, n, dtype=dtype, seed=seed, device=device)
    if seq_idx is None and docs:
        seq_idx = t["seq_idx"]
    fast = {k: t[k].clone().requires_grad_() for k in NAMES}
    ref = {k: t[k].float().clone().requires_grad_() for k in NAMES}  # reference in fp32 from the same values

    def run(fn, a):
        return fn(
            a["x"],
            a["dt"],
            a["A"],
            a["B"],
            a["C"],
            a["D"] if with_d else None,
            chunk_size=q,
            seq_idx=seq_idx,
            initial_state=a["init"] if with_init else None,
            z=a["z"] if with_z else None,
        )

    y, final = run(ssd_scan_triton, fast)
    y_r, final_r = run(ssd_scan_ref, ref)
    assert y.dtype == dtype and final.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_r, **TOL[dtype])
    torch.testing.assert_close(final, final_r, **TOL[dtype])
    gy = torch.randn(y.shape, device=device)
    gf = torch.randn(final.shape, device=device)
    ((y.float() * gy).sum() + (final * gf).sum()).backward()
    ((y_r * gy).sum() + (final_r * gf).sum()).backward()
    used = ["x", "dt", "A", "B", "C"] + ["D"] * with_d + ["init"] * with_init + ["z"] * with_z
    for k in used:
        a, r = fast[k].grad.float(), ref[k].grad
        scale = max(1.0, float(r.abs().max()))
        torch.testing.assert_close(a / scale, r / scale, **TOL[dtype], msg=lambda m: f"d{k}: {m}")


# (b, l, h, p, g, n, chunk): ragged last chunk, groups shared by heads, p / n not powers of two
@pytest.mark.parametrize(
    "shape,docs,with_init",
    [
        ((1, 40, 4, 8, 2, 16, 16), True, True),
        ((2, 23, 2, 5, 1, 6, 16), True, False),
        ((1, 32, 2, 16, 2, 16, 32), False, True),
    ],
)
def test_ssd_triton_fp32(shape, docs, with_init):
    _check(shape, torch.float32, docs, with_init, seed=shape[1])


def test_ssd_triton_resets_on_chunk_edges_z_no_d():
    seq_idx = torch.tensor([[0] * 16 + [1] * 16 + [2] + [3] * 6 + [4]], dtype=torch.int32, device=DEVICE)
    _check((1, 40, 2, 4, 1, 8, 16), torch.float32, True, True, with_z=True, with_d=False, seq_idx=seq_idx, seed=9)


def test_ssd_triton_fp16():
    _check((1, 35, 2, 8, 1, 16, 16), torch.float16, True, True, seed=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ssd_triton_gpu_super_shape(dtype):
    # one Super layer's scan at 2k tokens: 128 heads x 64, state 128, 8 groups, chunk 128
    _check((1, 2048 + 77, 128, 64, 8, 128, 128), dtype, True, True, seed=1, device="cuda")


@pytest.mark.gpu
def test_ssd_dispatcher_gpu_small_model():
    from latentforge.kernels.ssd import ssd_scan

    t = make_ssd_inputs(2, 1000, 8, 32, 2, 64, dtype=torch.bfloat16, seed=2, device="cuda")
    y, f = ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], chunk_size=128, seq_idx=t["seq_idx"])
    y_r, f_r = ssd_scan_ref(
        *(t[k].float() for k in ("x", "dt", "A", "B", "C", "D")), chunk_size=128, seq_idx=t["seq_idx"]
    )
    torch.testing.assert_close(y.float(), y_r, **TOL[torch.bfloat16])
    torch.testing.assert_close(f, f_r, **TOL[torch.bfloat16])
