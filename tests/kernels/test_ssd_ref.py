"""ssd_scan_ref against the float64 sequential recurrence."""

import pytest
import torch

from latentforge.kernels.ssd import ssd_scan, ssd_scan_ref
from tests.kernels.kernel_naive import random_seq_idx, ssd_naive


def make_ssd_inputs(b, l, h, p, g, n, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    dt = torch.empty(b, l, h, dtype=torch.float64).uniform_(0.01, 0.6, generator=gen)
    A = -torch.empty(h, dtype=torch.float64).uniform_(0.5, 4.0, generator=gen)
    B = torch.randn(b, l, g, n, generator=gen, dtype=torch.float64)
    C = torch.randn(b, l, g, n, generator=gen, dtype=torch.float64)
    D = torch.randn(h, generator=gen, dtype=torch.float64)
    init = torch.randn(b, h, p, n, generator=gen, dtype=torch.float64)
    z = torch.randn(b, l, h, p, generator=gen, dtype=torch.float64)
    seq_idx = random_seq_idx(b, l, 4, gen)
    low = torch.float32 if dtype != torch.float64 else dtype  # A, D and the state stay fp32

    def cast(t, dt_):
        return t.to(device=device, dtype=dt_)

    return dict(
        x=cast(x, dtype),
        dt=cast(dt, dtype),
        A=cast(A, low),
        B=cast(B, dtype),
        C=cast(C, dtype),
        D=cast(D, low),
        init=cast(init, low),
        z=cast(z, dtype),
        seq_idx=seq_idx.to(device),
    )


# (b, l, h, p, g, n, chunk): ragged lengths, a single partial chunk, groups shared and one group per head
SHAPES = [(2, 37, 4, 3, 2, 5, 8), (1, 16, 2, 4, 1, 3, 16), (2, 21, 4, 2, 4, 2, 4), (1, 5, 2, 2, 1, 2, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
def test_ssd_ref_matches_recurrence_fp64(shape, docs, with_init):
    b, l, h, p, g, n, q = shape
    t = make_ssd_inputs(b, l, h, p, g, n, seed=hash((shape, docs, with_init)) % 1000)
    seq_idx = t["seq_idx"] if docs else None
    init = t["init"] if with_init else None
    y, final = ssd_scan_ref(
        t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], chunk_size=q, seq_idx=seq_idx, initial_state=init
    )
    y_n, final_n = ssd_naive(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], seq_idx=seq_idx, initial_state=init)
    assert y.dtype == torch.float64 and final.dtype == torch.float64
    torch.testing.assert_close(y, y_n, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_n, rtol=0, atol=1e-10)


def test_ssd_ref_resets_on_chunk_boundaries_and_z():
    # documents starting exactly at a chunk start, one token long, and the last token alone
    b, l, h, p, g, n, q = 1, 24, 2, 2, 1, 3, 8
    t = make_ssd_inputs(b, l, h, p, g, n, seed=3)
    seq_idx = torch.tensor([[0] * 8 + [1] * 8 + [2] + [3] * 6 + [4]], dtype=torch.int32)
    y, final = ssd_scan_ref(
        t["x"], t["dt"], t["A"], t["B"], t["C"], None, chunk_size=q, seq_idx=seq_idx, initial_state=t["init"], z=t["z"]
    )
    y_n, final_n = ssd_naive(
        t["x"], t["dt"], t["A"], t["B"], t["C"], None, seq_idx=seq_idx, initial_state=t["init"], z=t["z"]
    )
    torch.testing.assert_close(y, y_n, rtol=0, atol=1e-10)
    torch.testing.assert_close(final, final_n, rtol=0, atol=1e-10)


def test_ssd_ref_chunk_size_invariant_and_final_state_chains():
    # splitting a sequence in two and passing the final state gives the same outputs (context parallelism)
    b, l, h, p, g, n = 2, 30, 4, 3, 2, 4
    t = make_ssd_inputs(b, l, h, p, g, n, seed=5)
    y, final = ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], chunk_size=8)
    y2, final2 = ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], chunk_size=32)
    torch.testing.assert_close(y, y2, rtol=0, atol=1e-10)
    s = 13
    ya, fa = ssd_scan_ref(
        *(t[k][:, :s] for k in ("x", "dt")), t["A"], t["B"][:, :s], t["C"][:, :s], t["D"], chunk_size=8
    )
    yb, fb = ssd_scan_ref(
        *(t[k][:, s:] for k in ("x", "dt")),
        t["A"],
        t["B"][:, s:],
        t["C"][:, s:],
        t["D"],
        chunk_size=8,
        initial_state=fa,
    )
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, rtol=0, atol=1e-10)
    torch.testing.assert_close(fb, final, rtol=0, atol=1e-10)


def test_ssd_ref_gradcheck_with_resets():
    b, l, h, p, g, n, q = 1, 11, 2, 2, 1, 2, 4
    t = make_ssd_inputs(b, l, h, p, g, n, seed=7)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2]], dtype=torch.int32)
    args = [t[k].clone().requires_grad_() for k in ("x", "dt", "A", "B", "C", "D", "init", "z")]

    def fn(x, dt, A, B, C, D, init, z):
        y, final = ssd_scan_ref(x, dt, A, B, C, D, chunk_size=q, seq_idx=seq_idx, initial_state=init, z=z)
        return y, final

    assert torch.autograd.gradcheck(fn, args, fast_mode=True)


def test_ssd_ref_bf16_inputs_fp32_state():
    t = make_ssd_inputs(2, 40, 4, 8, 2, 8, dtype=torch.bfloat16, seed=11)
    y, final = ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], chunk_size=16, seq_idx=t["seq_idx"])
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    y_n, final_n = ssd_naive(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], seq_idx=t["seq_idx"])
    torch.testing.assert_close(y.double(), y_n, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(final.double(), final_n, rtol=1e-4, atol=1e-4)


def test_ssd_dispatcher_uses_ref_on_cpu():
    t = make_ssd_inputs(1, 9, 2, 2, 1, 2, dtype=torch.float32, seed=1)
    y, f = ssd_scan(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], chunk_size=4)
    y_r, f_r = ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"], chunk_size=4)
    assert torch.equal(y, y_r) and torch.equal(f, f_r)


def test_ssd_bad_shapes_raise_clear_errors():
    t = make_ssd_inputs(1, 9, 4, 2, 2, 2, seed=1)
    with pytest.raises(ValueError, match="multiple of groups"):
        ssd_scan_ref(t["x"], t["dt"], t["A"], t["B"][:, :, :1].expand(1, 9, 3, 2), t["C"][:, :, :1].expand(1, 9, 3, 2))
    with pytest.raises(ValueError, match="dt must be"):
        ssd_scan_ref(t["x"], t["dt"][:, :5], t["A"], t["B"], t["C"])
