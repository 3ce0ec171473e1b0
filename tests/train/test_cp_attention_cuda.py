"""The CUDA block kernel of CP attention (train/parallel/cp_attention_cuda.py).

On CPU: the layout helpers (lse padding, bias alignment) against the layouts written out here; every call of the four
aten ops against their real schemas with meta tensors; and the whole CUDA adapter inside context_attention with CPU
fakes of the ops that keep the CUDA layouts (padded lse with +inf, (b, m, h, d) outputs, NaN for rows that see
nothing, bias heads equal to query heads, aligned bias rows) and assert what the CUDA kernels require, against plain
float64 attention and against the CPU SDPA path.
On CUDA (`gpu` mark, part of bench/gpu_acceptance.py): the real kernels against the hand-written reference path and
float64 attention: forward out and lse, dq / dk / dv, causal and document masks, GQA r = 1 and r > 1, fp32 and bf16,
uneven blocks (lse and bias padding), CP = 1 (group None).
"""

import pytest
import torch

from latentforge.train.parallel import cp_attention, cp_attention_cuda
from latentforge.train.parallel.cp_attention import context_attention
from latentforge.train.parallel.cp_attention_cuda import EfficientBlockOps, aligned_bias, pad_lse, unpad_lse

from .test_cp_attention_blocks import _full_attention, _inputs, _relative

NAN, INF = float("nan"), float("inf")
_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def test_lse_padding_round_trip():
    """The efficient kernel's lse rows are padded to a multiple of 32 with +inf: 33 rows -> 64, 32 -> 32, 1 -> 32."""
    for length, padded_length in ((1, 32), (31, 32), (32, 32), (33, 64), (70, 96)):
        lse = torch.randn(2, 3, length)
        padded = pad_lse(lse)
        assert padded.shape == (2, 3, padded_length) and padded.is_contiguous() and padded.dtype == torch.float32
        assert torch.equal(padded[..., :length], lse)
        assert bool((padded[..., length:] == INF).all())
        assert torch.equal(unpad_lse(padded, length), lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_aligned_bias_layout(dtype):
    """(b, 1, nq, nk) bool -> (b, heads, nq, nk) additive bias: 0 / -inf, rows 16-element aligned, heads by stride 0."""
    allowed = torch.rand(2, 1, 5, 21, generator=torch.Generator().manual_seed(0)) > 0.5
    bias = aligned_bias(allowed, 3, dtype)
    assert bias.shape == (2, 3, 5, 21) and bias.dtype == dtype
    assert bias.stride() == (5 * 32, 0, 32, 1)
    assert bias.data_ptr() % 16 == 0
    want = torch.where(allowed, 0.0, -INF).expand(2, 3, 5, 21)
    assert torch.equal(bias.float(), want)


def test_unsupported_inputs_get_one_clear_error():
    with pytest.raises(ValueError, match="float32, bfloat16 or float16, not float64"):
        cp_attention_cuda.check_inputs(torch.zeros(1, 1, 4, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="multiple of 8, not 12"):
        cp_attention_cuda.check_inputs(torch.zeros(1, 1, 4, 12, dtype=torch.bfloat16))
    cp_attention_cuda.check_inputs(torch.zeros(1, 1, 4, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("flash", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_calls_fit_the_real_op_schemas(flash, masked):
    """The adapter's calls through the real aten ops on meta tensors (their registered shape functions): argument
    order, keyword names, a None bias in the backward and the grad_input_mask are accepted; out and lse come back as
    (b, g, m, d) and (b, g, m) with the efficient kernel's padded lse sliced."""
    b, g, m, n, d = 2, 3, 40, 21, 16
    q, k, v = (torch.empty(b, g, length, d, dtype=torch.bfloat16, device="meta") for length in (m, n, n))
    bias = aligned_bias(torch.ones(b, 1, m, n, dtype=torch.bool, device="meta"), g, q.dtype) if masked else None
    ops = EfficientBlockOps(flash_for_unmasked=flash)
    out, lse = ops.forward(q, k, v, bias, 0.25)
    assert out.shape == (b, g, m, d) and lse.shape == (b, g, m) and lse.dtype == torch.float32
    ob, dob, lse_layouts = ops.backward_layouts(out, out, lse)
    grads = ops.backward(dob, q, k, v, bias, ob, lse_layouts, 0.25)
    assert [tuple(t.shape) for t in grads] == [(b, g, m, d), (b, g, n, d), (b, g, n, d)]


class FakeCudaKernels:
    """CPU stand-ins for the four CUDA ops, built on the CPU flash op, that return the CUDA layouts and assert the
    CUDA requirements; `calls` records (op, masked) per call."""

    def __init__(self):
        self.calls = []

    @staticmethod
    def _check_bias(bias, query, key):
        b, h, m, _ = query.shape
        assert bias.shape == (b, h, m, key.shape[2]), "the kernel wants bias heads == query heads"
        assert bias.dtype == query.dtype and bias.stride(-1) == 1
        assert bias.stride(2) % 16 == 0 and bias.stride(1) % 16 == 0 and bias.stride(0) % 16 == 0

    @staticmethod
    def _kernel_layout(x):
        return x.transpose(1, 2).contiguous().transpose(1, 2)  # written as (b, m, h, d)

    @staticmethod
    def _check_out(out):
        # the efficient backward reads `out` with row stride h * d, not out.stride(): (b, m, h, d) memory only
        assert out.transpose(1, 2).is_contiguous(), "out must have the (b, m, h, d) memory layout"

    def efficient(self, query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale):
        assert compute_log_sumexp and dropout_p == 0.0 and not is_causal
        assert key.shape[1] == query.shape[1] == value.shape[1], "no GQA in the efficient kernel"
        self.calls.append(("efficient", attn_bias is not None))
        if attn_bias is not None:
            self._check_bias(attn_bias, query, key)
        out, lse = _flash_cpu(query, key, value, 0.0, False, attn_mask=attn_bias, scale=scale)
        if attn_bias is not None:  # rows with nothing visible: the worst a CUDA kernel may return
            empty = (attn_bias == -INF).all(-1)
            out, lse = out.masked_fill(empty[..., None], NAN), lse.masked_fill(empty, NAN)
        b, h, m = lse.shape
        padded = torch.full((b, h, -(-m // 32) * 32), INF)
        padded[..., :m] = lse
        seed = torch.empty((), dtype=torch.int64)
        return self._kernel_layout(out), padded, seed, seed.clone()

    def efficient_backward(
        self,
        grad_out,
        query,
        key,
        value,
        attn_bias,
        out,
        lse,
        seed,
        offset,
        dropout_p,
        grad_input_mask,
        causal,
        *,
        scale,
    ):
        assert dropout_p == 0.0 and not causal and list(grad_input_mask) == [True, True, True, False]
        m = query.shape[2]
        assert lse.shape == (*query.shape[:2], -(-m // 32) * 32) and lse.is_contiguous() and lse.dtype == torch.float32
        assert bool((lse[..., m:] == INF).all()), "the backward reads the padding: it must be +inf"
        if attn_bias is not None:
            self._check_bias(attn_bias, query, key)
        self._check_out(out)
        self.calls.append(("efficient_backward", attn_bias is not None))
        grads = _flash_cpu_backward(
            grad_out, query, key, value, out, lse[..., :m].contiguous(), 0.0, False, attn_mask=attn_bias, scale=scale
        )
        return (*(self._kernel_layout(t) for t in grads), None)

    def flash(self, query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale):
        assert query.dtype in (torch.bfloat16, torch.float16) and dropout_p == 0.0 and not is_causal
        assert not return_debug_mask
        self.calls.append(("flash", False))
        out, lse = _flash_cpu(query, key, value, 0.0, False, scale=scale)
        rng = torch.empty(2, dtype=torch.int64)
        return self._kernel_layout(out), lse, None, None, query.shape[2], key.shape[2], rng, rng, torch.empty(0)

    def flash_backward(
        self,
        grad_out,
        query,
        key,
        value,
        out,
        lse,
        cum_q,
        cum_k,
        max_q,
        max_k,
        dropout_p,
        causal,
        seed,
        offset,
        *,
        scale,
    ):
        assert cum_q is None and cum_k is None and (max_q, max_k) == (query.shape[2], key.shape[2])
        assert lse.shape == query.shape[:3] and lse.is_contiguous() and dropout_p == 0.0 and not causal
        self.calls.append(("flash_backward", False))
        grads = _flash_cpu_backward(grad_out, query, key, value, out, lse, 0.0, False, scale=scale)
        return tuple(self._kernel_layout(t) for t in grads)


@pytest.fixture
def fake_cuda(monkeypatch):
    """context_attention(kernel="sdpa") on CPU runs the CUDA adapter over the fakes; .flash_for_unmasked = True sends unmasked blocks to flash."""
    fakes = FakeCudaKernels()
    fakes.flash_for_unmasked = False
    for name in ("efficient", "efficient_backward", "flash", "flash_backward"):
        monkeypatch.setattr(cp_attention_cuda, f"_{name}", getattr(fakes, name))

    def ops(q):
        cp_attention_cuda.check_inputs(q)
        return EfficientBlockOps(fakes.flash_for_unmasked)

    monkeypatch.setattr(cp_attention, "block_ops", ops)
    return fakes


def _grads(q, k, v, pos, doc, block, kernel):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = context_attention(q, k, v, pos, pos, doc, doc, None, block=block, kernel=kernel)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.dtype)
    return (out, *torch.autograd.grad(out, (q, k, v), grad)), grad


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
@pytest.mark.parametrize("block", [7, 16])
def test_cuda_adapter_with_fakes_matches_full_attention(fake_cuda, heads, kv_heads, block):
    """fp32 through the efficient-kernel path (flash takes no fp32): out and dq/dk/dv to 1e-5 of float64 attention,
    with documents starting inside blocks (rows seeing nothing come back NaN from the fake), blocks of 7 (lse rows
    and bias columns not multiples of 32 / 16) and unmasked blocks passing no bias."""
    q, k, v, doc = _inputs(50, heads=heads, kv_heads=kv_heads)
    pos = torch.arange(50)
    got, grad = _grads(q, k, v, pos, doc, block, "sdpa")
    assert _relative(got[0], _full_attention(q, k, v, pos, doc)) < 1e-5
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref = torch.autograd.grad(_full_attention(qd, kd, vd, pos, doc), (qd, kd, vd), grad.double())
    for name, a, b in zip("qkv", got[1:], ref):
        assert _relative(a, b) < 1e-5, (name, _relative(a, b))
    assert {("efficient", True), ("efficient_backward", True)} <= set(fake_cuda.calls)
    assert (("efficient", False) in fake_cuda.calls) == (block == 7)  # at 16 every block holds a document start
    assert not any(op.startswith("flash") for op, _ in fake_cuda.calls)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2)])
def test_cuda_adapter_with_fakes_equals_the_cpu_path_in_bf16(fake_cuda, monkeypatch, heads, kv_heads):
    """bf16 with flash on unmasked blocks and the efficient kernel on masked ones: the same numbers as the CPU SDPA
    path (the fakes run the same CPU kernel, so only the adapter's handling could differ), in the load-balanced
    order (blocks of 8: one chunk each) with a second document from position 32 in batch row 1."""
    from latentforge.train.parallel.token_order import TokenOrder

    q, k, v, _ = _inputs(64, heads=heads, kv_heads=kv_heads, dtype=torch.bfloat16)
    doc = torch.zeros(2, 64, dtype=torch.int32)
    doc[1, 32:] = 1
    pos = TokenOrder.choose(64, cp=4, load_balance=True).all_positions()
    q, k, v, doc = q[:, :, pos], k[:, :, pos], v[:, :, pos], doc[:, pos]
    with monkeypatch.context() as cpu_kernel:
        cpu_kernel.setattr(cp_attention, "block_ops", lambda q: cp_attention.CpuFlashBlockOps)
        cpu, _ = _grads(q, k, v, pos, doc, 8, "sdpa")
    assert fake_cuda.calls == []
    fake_cuda.flash_for_unmasked = True
    got, _ = _grads(q, k, v, pos, doc, 8, "sdpa")
    for name, a, b in zip(("out", "q", "k", "v"), got, cpu):
        assert a.dtype == b.dtype and _relative(a, b.double()) < 1e-6, (name, _relative(a, b.double()))
    assert {op for op, _ in fake_cuda.calls} == {"flash", "flash_backward", "efficient", "efficient_backward"}
    assert all(masked for op, masked in fake_cuda.calls if op.startswith("efficient"))


# ----- on a GPU ------------------------------------------------------------------------------------------------------
def _cuda_case(length, heads, kv_heads, documents, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, length, 64, generator=gen) for n in (heads, kv_heads, kv_heads))
    doc = torch.zeros(2, length, dtype=torch.int32)
    if documents:  # row 1: documents starting inside blocks and at a block start
        for cut in (5, 128, length // 2 + 3):
            doc[1, cut:] += 1
    return [t.to(dtype) for t in (q, k, v)], doc


def _counted(op, name: str, calls: list):
    def call(*args, **kwargs):
        calls.append(name)
        return op(*args, **kwargs)

    return call


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("documents", [False, True])
def test_cuda_sdpa_blocks_match_the_reference(monkeypatch, dtype, heads, kv_heads, documents):
    """The real kernels against the hand-written reference path on the same GPU and float64 attention: out, lse,
    dq, dk, dv through the block functions (400 tokens in blocks of 96: a last block of 16 rows, lse rows and bias
    columns not multiples of 32 / 16), and end to end through context_attention's autograd with group None. bf16
    sends the unmasked blocks to flash attention and fp32 sends none there (the ops are counted)."""
    from latentforge.train.parallel.cp_attention_reference import (
        reference_attention_blocks,
        reference_attention_blocks_backward,
    )

    calls = []
    for name in ("_efficient", "_efficient_backward", "_flash", "_flash_backward"):
        monkeypatch.setattr(cp_attention_cuda, name, _counted(getattr(cp_attention_cuda, name), name, calls))
    length, block, dev = 400, 96, torch.device("cuda")
    (q, k, v), doc = _cuda_case(length, heads, kv_heads, documents, dtype)
    pos = torch.arange(length)
    plan = cp_attention.block_plan(pos, pos, doc, doc, block)
    q5 = q.view(2, kv_heads, heads // kv_heads, length, 64)
    args = [t.to(dev) for t in (q5, k, v)]
    mask = cp_attention._BlockMask(pos.to(dev), pos.to(dev), doc.to(dev), doc.to(dev))
    scale = 64**-0.5
    out, lse = cp_attention.sdpa_attention_blocks(*args, mask, plan, scale)
    ref_out, ref_lse = reference_attention_blocks(*args, mask, plan, scale)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    got = cp_attention.sdpa_attention_blocks_backward(*args, out, grad, lse, mask, plan, scale)
    ref = reference_attention_blocks_backward(*args, ref_out, grad, ref_lse, mask, plan, scale)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert (lse - ref_lse).abs().max() < 10 * tol  # lse is O(log length): an absolute check
    for name, a, b in zip(("out", "dq", "dK", "dV"), (out, *got), (ref_out, *ref)):
        assert _relative(a.cpu(), b.cpu().double()) < tol, (name, _relative(a.cpu(), b.cpu().double()))
    flash = {"_flash", "_flash_backward"} if dtype == torch.bfloat16 else set()
    assert set(calls) == {"_efficient", "_efficient_backward"} | flash

    leaves = [t.to(dev).requires_grad_() for t in (q, k, v)]
    out = context_attention(
        *leaves, pos.to(dev), pos.to(dev), doc.to(dev), doc.to(dev), None, block=block, kernel="sdpa"
    )
    end_to_end = torch.autograd.grad(out, leaves, grad.view(out.shape))
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    want = _full_attention(qd, kd, vd, pos, doc)
    want_grads = torch.autograd.grad(want, (qd, kd, vd), grad.view(out.shape).cpu().double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *end_to_end), (want, *want_grads)):
        assert a.dtype == dtype and _relative(a.cpu(), b) < tol, (name, _relative(a.cpu(), b))
