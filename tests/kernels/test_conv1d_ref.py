"""causal_conv1d_ref against the float64 loop."""

import pytest
import torch

from tests.kernels.kernel_naive import conv1d_naive, random_seq_idx
from latentforge.kernels.conv1d import causal_conv1d, causal_conv1d_ref


def make_conv_inputs(b, l, c, k, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, c, generator=gen, dtype=torch.float64)
    w = torch.randn(c, k, generator=gen, dtype=torch.float64) * 0.5
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    init = torch.randn(b, c, k - 1, generator=gen, dtype=torch.float64)
    seq_idx = random_seq_idx(b, l, 5, gen)
    pdt = dtype if dtype == torch.float64 else torch.float32
    return dict(
        x=x.to(device=device, dtype=dtype),
        w=w.to(device=device, dtype=pdt),
        bias=bias.to(device=device, dtype=pdt),
        init=init.to(device=device, dtype=dtype),
        seq_idx=seq_idx.to(device),
    )


@pytest.mark.parametrize("shape", [(2, 19, 5, 4), (1, 2, 3, 4), (2, 9, 4, 2), (1, 7, 3, 1)])
@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("activation", ["silu", None])
def test_conv1d_ref_matches_loop_fp64(shape, docs, with_init, activation):
    b, l, c, k = shape
    t = make_conv_inputs(b, l, c, k, seed=l * 7 + c + docs * 3 + with_init)
    kw = dict(
        seq_idx=t["seq_idx"] if docs else None, initial_state=t["init"] if with_init else None, activation=activation
    )
    y, final = causal_conv1d_ref(t["x"], t["w"], t["bias"], **kw)
    y_n, final_n = conv1d_naive(t["x"], t["w"], t["bias"], **kw)
    torch.testing.assert_close(y, y_n, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, final_n, rtol=0, atol=1e-12)


def test_conv1d_ref_document_starts_and_state_chaining():
    b, l, c, k = 1, 12, 3, 4
    t = make_conv_inputs(b, l, c, k, seed=2)
    seq_idx = torch.tensor([[0, 0, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3]], dtype=torch.int32)
    y, final = causal_conv1d_ref(t["x"], t["w"], t["bias"], seq_idx=seq_idx, initial_state=t["init"])
    y_n, final_n = conv1d_naive(t["x"], t["w"], t["bias"], seq_idx=seq_idx, initial_state=t["init"])
    torch.testing.assert_close(y, y_n, rtol=0, atol=1e-12)
    torch.testing.assert_close(final, final_n, rtol=0, atol=1e-12)
    # without documents, running in two pieces with the carried state equals one run (decoding / CP)
    y, final = causal_conv1d_ref(t["x"], t["w"], t["bias"])
    ya, fa = causal_conv1d_ref(t["x"][:, :5], t["w"], t["bias"])
    yb, fb = causal_conv1d_ref(t["x"][:, 5:], t["w"], t["bias"], initial_state=fa)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(fb, final, rtol=0, atol=1e-12)


def test_conv1d_ref_gradcheck():
    t = make_conv_inputs(1, 9, 3, 4, seed=4)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]], dtype=torch.int32)
    args = [t[k].clone().requires_grad_() for k in ("x", "w", "bias", "init")]
    assert torch.autograd.gradcheck(
        lambda x, w, b, s: causal_conv1d_ref(x, w, b, seq_idx=seq_idx, initial_state=s), args, fast_mode=True
    )


def test_conv1d_ref_bf16_and_dispatcher():
    t = make_conv_inputs(2, 33, 16, 4, dtype=torch.bfloat16, seed=9)
    y, final = causal_conv1d(t["x"], t["w"], t["bias"], seq_idx=t["seq_idx"])
    assert y.dtype == torch.bfloat16 and final.dtype == torch.bfloat16
    y_n, _ = conv1d_naive(t["x"], t["w"], t["bias"], seq_idx=t["seq_idx"])
    torch.testing.assert_close(y.double(), y_n, rtol=1.6e-2, atol=1e-2)


def test_conv1d_bad_weight_shape_raises():
    t = make_conv_inputs(1, 5, 3, 4)
    with pytest.raises(ValueError, match="squeeze"):
        causal_conv1d_ref(t["x"], t["w"].unsqueeze(1))
