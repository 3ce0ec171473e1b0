"""Quantizer emulation (kernels/quant.py) against independent references.

The references below are written separately from the code under test: brute-force nearest-value
search over the format's full value table (ties to the even code), numpy float32 arithmetic for the
NVFP4 two-level scales, float64 math for power-of-two scale choices.
"""

import math

import numpy as np
import pytest
import torch

from latentforge.kernels import quant as q


@pytest.fixture(autouse=True)
def _one_thread():
    # many small ops: one thread avoids OpenMP spin contention on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------
# independent references


def fp8_table(fmt):
    """All finite FP8 values by code, decoded by torch (decoding involves no rounding)."""
    dtype = q.FP8_DTYPES[fmt]
    vals = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    codes = torch.arange(256)
    keep = torch.isfinite(vals)
    return vals[keep].double(), codes[keep]


def nearest_even_ref(x, values, codes):
    """Round each x to the nearest table value; ties go to the even code. Saturates at the table ends."""
    x = x.double().clamp(values.min(), values.max())  # saturation
    dist = (x[:, None] - values[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    tie = dist == best
    # among the tied candidates prefer an even code, and +0 over -0 for zeros of the same sign
    score = tie.double() * 4 + ((codes[None, :] % 2) == 0).double() * 2
    score = score + (torch.sign(values)[None, :] == torch.sign(x)[:, None]).double()
    return values[score.argmax(dim=1)]


E2M1_TABLE = torch.tensor([s * v for s in (1.0, -1.0) for v in q.E2M1_VALUES], dtype=torch.float64)
E2M1_CODES = torch.arange(16)


def np_e4m3(v):
    """Round positive float32 numpy values to E4M3 by table search (saturating)."""
    vals, codes = fp8_table("e4m3")
    t = torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1))
    return nearest_even_ref(t, vals, codes).numpy().astype(np.float32).reshape(np.shape(v))


def nvfp4_numpy_ref(x, two_d=False):
    """Per-block NVFP4 quantization in numpy float32, following TE's reference quantizer formulas."""
    x = x.numpy().astype(np.float32)
    m, k = x.shape
    f32 = np.float32
    amax = f32(np.abs(x).max())
    s_enc = f32(f32(448.0 * 6.0) / amax) if amax > 0 else f32(np.finfo(np.float32).max)
    s_dec = f32(f32(1.0) / s_enc)
    mult = f32(s_enc * f32(f32(1.0) / f32(6.0)))
    data = np.zeros_like(x)
    br = 16 if two_d else 1
    n_rb, n_cb = math.ceil(m / br), math.ceil(k / 16)
    scales = np.zeros((n_rb, n_cb), dtype=np.float32)
    for rb in range(n_rb):
        for cb in range(n_cb):
            blk = x[rb * br : (rb + 1) * br, cb * 16 : (cb + 1) * 16]
            bs = np_e4m3(min(f32(f32(np.abs(blk).max()) * mult), f32(448.0)))
            scales[rb, cb] = bs
            enc = f32(f32(1.0) / f32(bs * s_dec)) if bs > 0 else f32(np.finfo(np.float32).max)
            scaled = np.clip((blk * enc).astype(np.float32), -6.0, 6.0)
            t = torch.from_numpy(scaled.astype(np.float64).reshape(-1))
            rounded = nearest_even_ref(t, E2M1_TABLE, E2M1_CODES).numpy().reshape(blk.shape)
            data[rb * br : (rb + 1) * br, cb * 16 : (cb + 1) * 16] = rounded
    return torch.from_numpy(data), torch.from_numpy(scales), float(amax)


# ----------------------------------------------------------------------------------------------
# element casts


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_cast_exact_on_representable_values(fmt):
    vals, _ = fp8_table(fmt)
    assert torch.equal(q.cast_fp8(vals.float(), fmt).double(), vals)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_cast_rounds_to_nearest_even_and_saturates(fmt):
    vals, codes = fp8_table(fmt)
    pos = torch.unique(vals[vals > 0]).sort().values
    mids = ((pos[1:] + pos[:-1]) / 2).float()  # exact ties (representable in fp32)
    g = torch.Generator().manual_seed(0)
    rand = (torch.randn(4000, generator=g) * torch.exp2(torch.randint(-12, 14, (4000,), generator=g))).float()
    beyond = torch.tensor([q.FP8_MAX[fmt] * 1.06, q.FP8_MAX[fmt] * 1.5, 1e30, -1e30])
    x = torch.cat([mids, -mids, rand, beyond])
    expected = nearest_even_ref(x, vals, codes)
    got = q.cast_fp8(x, fmt).double()
    assert torch.equal(got, expected)
    assert got.abs().max() == q.FP8_MAX[fmt]  # saturation, never inf


def test_e2m1_exact_and_round_to_nearest_even():
    grid = E2M1_TABLE.float()
    assert torch.equal(q.round_e2m1(grid).double(), E2M1_TABLE)
    pos = torch.tensor(q.E2M1_VALUES)
    ties = (pos[1:] + pos[:-1]) / 2  # 0.25 0.75 1.25 1.75 2.5 3.5 5
    assert q.round_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    x = torch.cat([ties, -ties, torch.linspace(-7, 7, 2801), torch.tensor([6.5, 100.0, -9.0])])
    assert torch.equal(q.round_e2m1(x).double(), nearest_even_ref(x, E2M1_TABLE, E2M1_CODES))


def test_e2m1_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(1)
    values = torch.tensor([0.1, 0.3, 0.74, 1.1, 1.6, 2.2, 2.9, 3.3, 4.5, 5.9, -0.8, -2.6, -5.0])
    n = 20000
    samples = q.round_e2m1(values.repeat(n, 1), stochastic=True, generator=g)
    # every sample is one of the two grid neighbours
    lo = torch.tensor([0.0, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 3.0, 4.0, 4.0, -1.0, -3.0, -6.0])
    hi = torch.tensor([0.5, 0.5, 1.0, 1.5, 2.0, 3.0, 3.0, 4.0, 6.0, 6.0, -0.5, -2.0, -4.0])
    assert ((samples == lo) | (samples == hi)).all()
    # mean within 5 standard errors of the true value (a biased rounding misses by up to step/2)
    p = (values - lo) / (hi - lo)
    stderr = (hi - lo).abs() * torch.sqrt(p * (1 - p) / n)
    assert ((samples.mean(0) - values).abs() <= 5 * stderr + 1e-6).all()
    # nearest rounding on the same inputs is biased (sanity: the test can fail)
    assert ((q.round_e2m1(values) - values).abs() > 5 * stderr + 1e-6).any()


def test_e8m0_exponent_rounds_up():
    v = torch.tensor([1.0, 1.5, 2.0, 3.0, 0.75, 2.0**-126, 2.0**-127, 2.0**-127 * 1.5, 0.0, 2.0**100 * 1.1])
    got = q.e8m0_biased_exponent(v).tolist()
    expected = []
    for x in v.tolist():
        if x == 0:
            expected.append(0)
            continue
        mant, exp = math.frexp(x)  # x = mant * 2**exp, mant in [0.5, 1)
        e = exp - 1 + (0 if mant == 0.5 else 1)  # ceil(log2(x))
        expected.append(max(e + 127, 0))
    # fp32 subnormals at or below 2**-127 map to biased 0 in TE's conversion
    expected[6] = 0
    assert got == expected


# ----------------------------------------------------------------------------------------------
# scale choice


def test_fp8_tensorwise_scale_choice_and_saturation():
    x = torch.randn(33, 70) * 3.7
    for fmt in ("e4m3", "e5m2"):
        qt = q.quantize_fp8_tensorwise(x, fmt)
        amax = x.abs().max()
        assert qt.scale_inv.item() == pytest.approx(amax.item() / q.FP8_MAX[fmt], rel=1e-6)
        assert qt.data.abs().max() == q.FP8_MAX[fmt]  # the amax element maps to the format max
        vals, codes = fp8_table(fmt)
        assert torch.equal(
            qt.data.double().reshape(-1), nearest_even_ref((x * (q.FP8_MAX[fmt] / amax)).reshape(-1), vals, codes)
        )
    zero = q.quantize_fp8_tensorwise(torch.zeros(4, 4))
    assert zero.scale_inv.item() == 1.0 and torch.equal(zero.dequantize(), torch.zeros(4, 4))
    # a given (delayed) scale that is too large saturates instead of overflowing
    sat = q.quantize_fp8_with_scale(torch.tensor([[1.0, -1000.0]]), torch.tensor(128.0), "e5m2")
    assert sat.data.tolist() == [[128.0, -57344.0]]


def test_fp8_block_scales_are_power_of_two_floor():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(130, 260, generator=g) * torch.exp2(torch.randint(-6, 6, (130, 1), generator=g).float())
    qt = q.quantize_fp8_block(x, (1, 128))
    assert qt.scale_inv.shape == (130, 3)
    xp = torch.nn.functional.pad(x, (0, 124))
    amax = xp.reshape(130, 3, 128).abs().amax(-1).double()
    expected_scale = torch.exp2(torch.floor(torch.log2(448.0 / amax)))
    assert torch.equal(torch.reciprocal(qt.scale_inv.double()), expected_scale)
    assert qt.data.abs().max() <= 448
    sq = q.quantize_fp8_block(x, (128, 128))
    assert sq.scale_inv.shape == (2, 3)
    # the transpose of a square-tile tensor is the same quantization of x.T
    assert torch.equal(sq.t().dequantize(), q.quantize_fp8_block(x.t(), (128, 128)).dequantize())


def test_mxfp8_scale_is_e8m0_round_up_and_never_saturates():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 100, generator=g) * torch.exp2(torch.randint(-20, 20, (7, 1), generator=g).float())
    qt = q.quantize_mxfp8(x)
    assert qt.scale_inv.shape == (7, 4)
    amax = torch.nn.functional.pad(x, (0, 28)).reshape(7, 4, 32).abs().amax(-1)
    v = (amax * torch.tensor(1 / 448, dtype=torch.float32)).double()
    expected = torch.exp2(torch.ceil(torch.log2(v)))
    assert torch.equal(qt.scale_inv.double(), expected)
    assert qt.data.abs().max() <= 448
    # values already on the grid of their block scale come back exactly
    exact = torch.tensor(fp8_table("e4m3")[0][128:160].tolist()).float().reshape(1, 32) * 2.0**-5
    exact[0, 0] = 448 * 2.0**-5
    assert torch.equal(q.quantize_mxfp8(exact).dequantize(), exact)


def test_nvfp4_matches_numpy_reference_bit_for_bit():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(37, 80, generator=g) * torch.exp2(
        torch.randint(-8, 8, (37, 5), generator=g).float()
    ).repeat_interleave(16, 1)
    for two_d in (False, True):
        qt = q.quantize_nvfp4(x, two_d=two_d)
        data, scales, amax = nvfp4_numpy_ref(x, two_d)
        assert torch.equal(qt.data, data)
        assert torch.equal(qt.scale_inv, scales)
        assert qt.global_scale_inv.item() == pytest.approx(amax / 2688, rel=1e-7)


def test_nvfp4_exact_on_representable_values_and_2d_transpose():
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (32, 64), generator=g)
    vals = E2M1_TABLE.float()[codes]
    vals[:, ::16] = 6.0  # every block reaches the E2M1 max
    block_scale = torch.exp2(torch.randint(-3, 3, (32, 4), generator=g).float())
    block_scale[0, 0] = 7.0  # tensor amax 42 = 2688 / 64: a power-of-two global scale, block scale 448
    x = vals * block_scale.repeat_interleave(16, 1)
    qt = q.quantize_nvfp4(x)
    assert torch.equal(qt.dequantize(), x)
    w = torch.randn(48, 64, generator=g)
    assert torch.equal(
        q.quantize_nvfp4(w, two_d=True).t().dequantize(), q.quantize_nvfp4(w.t(), two_d=True).dequantize()
    )


def test_nvfp4_stochastic_rounding_unbiased_on_a_tensor():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 64, generator=g)
    n = 400
    mean = sum(q.quantize_nvfp4(x, stochastic=True, generator=g).dequantize() for _ in range(n)) / n
    near = q.quantize_nvfp4(x).dequantize()
    err_sr = (mean - x).abs().mean() / x.abs().mean()
    err_rne = (near - x).abs().mean() / x.abs().mean()
    assert err_sr < err_rne / 4


# ----------------------------------------------------------------------------------------------
# Hadamard transform


def test_hadamard_orthogonal_and_inverse_exact():
    h = q.hadamard16()
    assert torch.equal(h @ h.t(), torch.eye(16))
    assert set(h.abs().unique().tolist()) == {0.25}
    assert torch.equal(h[:, 0] * 4, torch.tensor(q.RHT_SIGNS, dtype=torch.float32))
    x = torch.randint(-64, 64, (6, 48)).float()  # small integers: every product and sum is exact
    y = q.rht16(x)
    assert not torch.equal(y, x)
    assert torch.equal(q.rht16(y, inverse=True), x)
    xd = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(q.rht16(q.rht16(xd), inverse=True), xd, rtol=0, atol=1e-14)
    # block-diagonal: blocks of 16 don't mix
    e = torch.zeros(1, 32)
    e[0, 20] = 1.0
    assert q.rht16(e)[0, :16].abs().max() == 0
    with pytest.raises(ValueError, match="multiple of 16"):
        q.rht16(torch.zeros(2, 20))


# ----------------------------------------------------------------------------------------------
# delayed scaling


def test_delayed_scaler_uses_history_window():
    s = q.DelayedScaler("e4m3", history_len=3)
    amaxes = [2.0, 8.0, 1.0, 0.5, 0.25, 4.0]
    used = []
    for a in amaxes:
        x = torch.tensor([[a, -a / 3]])
        qt = s.quantize(x)
        used.append(torch.reciprocal(qt.scale_inv).item())
    # the scale of step t comes from the max amax of steps t-3 .. t-1; the first step uses 1
    expected = [1.0]
    for t in range(1, len(amaxes)):
        window = amaxes[max(0, t - 3) : t]
        expected.append(448.0 / max(window))
    assert used == pytest.approx(expected, rel=1e-7)
    # a step with a larger amax than its (stale) scale allows saturates
    s2 = q.DelayedScaler("e4m3", history_len=4)
    s2.quantize(torch.tensor([[1.0]]))
    assert s2.quantize(torch.tensor([[10.0]])).dequantize().item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------
# emulated linear


def _operands(recipe, x, w):
    xr, xc = recipe.quantize_input(x, True)
    wr, wc = recipe.quantize_weight(w, True)
    return xr, xc, wr, wc


@pytest.mark.parametrize("name", ["fp8_current", "fp8_block", "mxfp8"])
def test_quantized_linear_gemms_use_quantized_operands(name):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 24, 64, generator=g, requires_grad=True)
    w = torch.randn(32, 64, generator=g, requires_grad=True)
    dy = torch.randn(2, 24, 32, generator=g)
    y = q.quantized_linear(x, w, None, q.make_recipe(name))
    y.backward(dy)
    rec = q.make_recipe(name)
    xr, xc, wr, wc = _operands(rec, x.detach().reshape(-1, 64), w.detach())
    dyr, dyc = rec.quantize_grad(dy.reshape(-1, 32), True)
    torch.testing.assert_close(y.detach().reshape(-1, 32), xr @ wr.t(), rtol=0, atol=0)
    torch.testing.assert_close(x.grad.reshape(-1, 64), dyr @ wc.t(), rtol=0, atol=0)
    torch.testing.assert_close(w.grad, dyc @ xc.t(), rtol=0, atol=0)
    # and the quantized GEMMs stay close to the exact ones
    assert (y.detach() - x.detach() @ w.detach().t()).norm() / y.norm() < 0.05
    assert (w.grad - dy.reshape(-1, 32).t() @ x.detach().reshape(-1, 64)).norm() / w.grad.norm() < 0.1  # E5M2 grads


def test_quantized_linear_operand_formats_follow_te_recipes():
    g = torch.Generator().manual_seed(8)
    x, w, dy = torch.randn(40, 64, generator=g), torch.randn(32, 64, generator=g), torch.randn(40, 32, generator=g)
    # HYBRID: E4M3 forward, E5M2 gradients (per tensor)
    cur = q.make_recipe("fp8_current")
    dyr, dyc = cur.quantize_grad(dy, True)
    assert torch.equal(dyr, q.quantize_fp8_tensorwise(dy, "e5m2").dequantize())
    xr, _ = cur.quantize_input(x, False)
    assert torch.equal(xr, q.quantize_fp8_tensorwise(x, "e4m3").dequantize())
    assert torch.equal(dyc, dyr.t())
    # MXFP8 col copies are requantized from high precision, not transposed
    mx = q.make_recipe("mxfp8")
    x = x * torch.exp2(torch.randint(-4, 4, (40, 1), generator=g).float())  # rows of different scales
    xr, xc = mx.quantize_input(x, True)
    assert torch.equal(xc, q.quantize_mxfp8(x.t()).dequantize()) and not torch.equal(xc, xr.t())
    # NVFP4: weights 16x16 (col == row.T), inputs RHT'd along the tokens for wgrad, grads stochastic
    nv = q.make_recipe("nvfp4", generator=torch.Generator().manual_seed(0))
    wr, wc = nv.quantize_weight(w, True)
    assert torch.equal(wc, wr.t())
    _, xc = nv.quantize_input(x[:32], True)
    assert torch.equal(xc, q.quantize_nvfp4(q.rht16(x[:32].t())).dequantize())
    _, xc_padded = nv.quantize_input(x, True)  # 40 tokens: padded with zeros to 48 for the RHT
    assert xc_padded.shape == (64, 48)
    a, _ = nv.quantize_grad(dy, False)
    b, _ = nv.quantize_grad(dy, False)
    assert not torch.equal(a, b)  # stochastic rounding draws fresh bits


def test_nvfp4_linear_gradients_are_unbiased_and_rht_cancels():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(48, 64, generator=g, requires_grad=True)
    w = torch.randn(32, 64, generator=g, requires_grad=True)
    dy = torch.randn(48, 32, generator=g)
    recipe = q.make_recipe("nvfp4", generator=torch.Generator().manual_seed(1))
    n = 200
    dx_sum = torch.zeros_like(x)
    for _ in range(n):
        x.grad = None
        q.quantized_linear(x, w, None, recipe).backward(dy)
        dx_sum += x.grad
    # E[dx] = E[Q_sr(dy)] @ Q(w) = dy @ Q(w) (the weight quantization is deterministic)
    _, wc = recipe.quantize_weight(w.detach(), True)
    target = dy @ wc.t()
    bias_err = (dx_sum / n - target).norm() / target.norm()
    one_err = (x.grad - target).norm() / target.norm()
    assert bias_err < one_err / 5
    # wgrad with RHT on both operands approximates dy.T @ x (the transform cancels in the product)
    w.grad = None
    q.quantized_linear(x, w, None, q.make_recipe("nvfp4", stochastic_rounding=False)).backward(dy)
    exact = dy.t() @ x.detach()
    assert (w.grad - exact).norm() / exact.norm() < 0.2


def test_bf16_recipe_is_plain_linear_and_bad_shapes_are_named():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    assert torch.equal(q.quantized_linear(x, w, None, q.make_recipe("bf16")), x @ w.t())
    with pytest.raises(ValueError, match="features"):
        q.quantized_linear(torch.randn(3, 7), w, None, q.make_recipe("nvfp4"))
    with pytest.raises(ValueError, match="unknown precision recipe"):
        q.make_recipe("fp6")


def test_expert_gemm_keeps_delayed_state_per_expert_and_handles_empty():
    stacked = torch.randn(4, 16, 32, requires_grad=True)
    fn = q.ExpertGemm("fp8_delayed", amax_history_len=8)
    for e in range(4):
        y = fn(torch.randn(5, 32), stacked[e])
        assert y.shape == (5, 16)
    assert len(fn._recipes) == 4
    assert fn(torch.zeros(0, 32), stacked[0]).shape == (0, 16)
    y = q.ExpertGemm("nvfp4")(torch.randn(5, 32), stacked[1])
    y.sum().backward()
    assert stacked.grad[1].abs().sum() > 0 and stacked.grad[0].abs().sum() == 0


# ----------------------------------------------------------------------------------------------
# against Transformer Engine's own quantizers (GPU only)


def _te():
    return pytest.importorskip("transformer_engine.pytorch")


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_current_matches_te(fmt):
    te_mod = _te()
    import transformer_engine_torch as tex

    dtype = tex.DType.kFloat8E4M3 if fmt == "e4m3" else tex.DType.kFloat8E5M2
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16) * 3
    quantizer = te_mod.Float8CurrentScalingQuantizer(fp8_dtype=dtype, device=x.device)
    ours = q.quantize_fp8_tensorwise(x, fmt).dequantize()
    torch.testing.assert_close(quantizer(x).dequantize(dtype=torch.float32), ours, rtol=0, atol=0)


@pytest.mark.gpu
def test_fp8_block_matches_te():
    te_mod = _te()
    import transformer_engine_torch as tex

    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    for dim, tile in ((1, (1, 128)), (2, (128, 128))):
        quantizer = te_mod.Float8BlockQuantizer(
            fp8_dtype=tex.DType.kFloat8E4M3,
            rowwise=True,
            columnwise=False,
            amax_epsilon=0.0,
            force_pow_2_scales=True,
            block_scaling_dim=dim,
        )
        ours = q.quantize_fp8_block(x, tile).dequantize()
        torch.testing.assert_close(quantizer(x).dequantize(dtype=torch.float32), ours, rtol=0, atol=0)


@pytest.mark.gpu
def test_mxfp8_matches_te():
    te_mod = _te()
    if not te_mod.is_mxfp8_available():
        pytest.skip("MXFP8 needs compute capability 10.0")
    import transformer_engine_torch as tex

    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    quantizer = te_mod.MXFP8Quantizer(fp8_dtype=tex.DType.kFloat8E4M3, rowwise=True, columnwise=False)
    torch.testing.assert_close(
        quantizer(x).dequantize(dtype=torch.float32), q.quantize_mxfp8(x).dequantize(), rtol=0, atol=0
    )


@pytest.mark.gpu
def test_nvfp4_matches_te():
    te_mod = _te()
    if not te_mod.is_nvfp4_available():
        pytest.skip("NVFP4 needs compute capability 10.0")
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    for two_d in (False, True):
        quantizer = te_mod.NVFP4Quantizer(
            rowwise=True, columnwise=False, with_rht=False, with_2d_quantization=two_d, stochastic_rounding=False
        )
        # the per-tensor factor is applied in a different order by TE's dequantize: allow 1 ulp
        torch.testing.assert_close(
            quantizer(x).dequantize(dtype=torch.float32),
            q.quantize_nvfp4(x, two_d=two_d).dequantize(),
            rtol=2e-7,
            atol=0,
        )
