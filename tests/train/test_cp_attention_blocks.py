"""The per-block kernels of context-parallel attention (train/parallel/cp_attention.py) against plain full attention
written out here (scores, mask, softmax in float64; no SDPA): values and gradients in fp32 to 1e-5 for the SDPA
block kernel and the hand-written one, with grouped-query heads, causal + document masks, query rows that see
nothing in some key blocks, blocks of uneven size, a permuted token order; the unmasked-block fast path, its
host-side flags in block_plan, a block loop that reads nothing back from the device; and what the autograd graph
keeps for the backward under CP2 (this rank's shard only: O(s/cp)).
"""

import pytest
import torch

from latentforge.train.parallel import cp_attention
from latentforge.train.parallel.cp_attention import context_attention, resolve_kernel
from tests.distributed import run_distributed

from .test_parallel_common import one_thread

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

KERNELS = ["sdpa", "reference"]


def _full_attention(q, k, v, pos, doc):
    """Plain causal, document-masked GQA in float64: q (b, h, L, d), k/v (b, kv, L, d), pos (L,), doc (b, L)."""
    q, k, v = q.double(), k.double(), v.double()
    repeats = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(repeats, 1), v.repeat_interleave(repeats, 1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    allowed = (pos[None, :] <= pos[:, None])[None] & (doc[:, :, None] == doc[:, None, :])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, -1) @ v


def _inputs(length, heads=6, kv_heads=2, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, length, d, generator=g, dtype=dtype) for n in (heads, kv_heads, kv_heads))
    # row 0 one document; row 1 documents starting inside blocks, at block starts and at the last token
    doc = torch.zeros(2, length, dtype=torch.int32)
    for cut in (3, 7, 8, length // 2 + 1, length - 1):
        doc[1, cut:] += 1
    return q, k, v, doc


def _relative(a, b):
    return float((a.detach().double() - b.detach()).abs().max() / b.detach().abs().max())


def _check(kernel, q, k, v, pos, doc, block):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = context_attention(q, k, v, pos, pos, doc, doc, None, block=block, kernel=kernel)
    want = _full_attention(q, k, v, pos, doc)
    assert out.dtype == q.dtype and _relative(out, want) < 1e-5
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad.double())
    for name, a, b in zip("qkv", got, ref):
        assert _relative(a, b) < 1e-5, (kernel, name, _relative(a, b))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("block", [7, 16, 64])
def test_block_kernels_match_full_attention(kernel, block):
    """Uneven blocks (50 tokens: 7 x 7 + 1), rows of a new document seeing nothing in earlier key blocks."""
    q, k, v, doc = _inputs(50)
    _check(kernel, q, k, v, torch.arange(50), doc, block)


@pytest.mark.parametrize("kernel", KERNELS)
def test_block_kernels_in_a_permuted_order(kernel):
    """Load-balanced order: positions not ascending inside a block, so in-block masks are irregular."""
    from latentforge.train.parallel.token_order import TokenOrder

    q, k, v, doc = _inputs(64)
    pos = TokenOrder.choose(64, cp=4, load_balance=True).all_positions()
    _check(kernel, q[:, :, pos], k[:, :, pos], v[:, :, pos], pos, doc[:, pos], block=12)


def test_unmasked_blocks_pass_no_mask_and_empty_rows_are_dropped(monkeypatch):
    """One document, block 8: key blocks wholly before the query block go to the kernel without a mask; with a
    document starting at 10, rows 10-15 see nothing in key block 0-7 (the kernel's lse 0 there must not count)."""
    masks = []
    kernel_op = cp_attention._flash_cpu

    def spy(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask is None)
        return kernel_op(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(cp_attention, "_flash_cpu", spy)
    q, k, v, _ = _inputs(32)
    one_document = torch.zeros(1, 32, dtype=torch.int32)
    _check("sdpa", q[:1], k[:1], v[:1], torch.arange(32), one_document, block=8)
    assert any(masks) and not all(masks)
    two_documents = one_document.clone()
    two_documents[:, 10:] = 1
    _check("sdpa", q[:1], k[:1], v[:1], torch.arange(32), two_documents, block=8)


@pytest.mark.parametrize("block", [5, 8, 12])
def test_block_plan_flags_masked_blocks_on_the_host(block):
    """Each visited block's "needs a mask" flag equals "some pair is hidden" from the pairwise rule written out here,
    in permuted and natural order, with documents starting inside and at block starts; skipped blocks see nothing."""
    from latentforge.train.parallel.token_order import TokenOrder

    _, _, _, doc = _inputs(48)
    natural, permuted = torch.arange(48), TokenOrder.choose(48, cp=4, load_balance=True).all_positions()
    for pos, docs in ((natural, doc), (permuted, doc[:, permuted]), (natural, doc[:1])):
        plan = cp_attention.block_plan(pos, pos, docs, docs, block)
        for q0, q1, visits in plan:
            visited = {(k0, k1) for k0, k1, _ in visits}
            for k0 in range(0, 48, block):
                k1 = min(k0 + block, 48)
                causal = pos[None, k0:k1] <= pos[q0:q1, None]
                if (k0, k1) not in visited:
                    assert not causal.any()
                    continue
                needs_mask = next(m for a, b, m in visits if (a, b) == (k0, k1))
                allowed = causal[None] & (docs[:, q0:q1, None] == docs[:, None, k0:k1])
                assert needs_mask == (not bool(allowed.all())), (q0, k0)
    one_document = cp_attention.block_plan(natural, natural, doc[:1], doc[:1], block)
    assert any(not needs_mask for _, _, visits in one_document for *_, needs_mask in visits)


def test_block_loop_reads_nothing_back_from_the_device(monkeypatch):
    """The per-layer block loop decides masks from the plan: with the plan made, Tensor.all / Tensor.item /
    bool(tensor) are never called during the forward and backward (on CUDA each would be a device sync)."""
    q, k, v, doc = _inputs(32)
    pos = torch.arange(32)
    plan = cp_attention.block_plan(pos, pos, doc, doc, 8)
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    reads = []
    for name in ("all", "item", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    out = context_attention(q, k, v, pos, pos, doc, doc, None, plan=plan, kernel="sdpa")
    out.sum().backward()
    monkeypatch.undo()
    assert reads == []


def test_bfloat16_through_the_sdpa_kernel():
    q, k, v, doc = _inputs(40, dtype=torch.bfloat16)
    pos = torch.arange(40)
    out = context_attention(q, k, v, pos, pos, doc, doc, None, block=16, kernel="sdpa")
    assert out.dtype == torch.bfloat16 and _relative(out, _full_attention(q, k, v, pos, doc)) < 2e-2


def test_kernel_choice():
    assert resolve_kernel("auto", torch.device("cpu")) == "sdpa"
    assert resolve_kernel("auto", torch.device("cuda")) == "reference"  # until a GPU run verifies "sdpa" there
    assert resolve_kernel("sdpa", torch.device("cuda")) == "sdpa"
    with pytest.raises(ValueError, match="runs on CPU and CUDA, not on mps"):
        resolve_kernel("sdpa", torch.device("mps"))
    with pytest.raises(ValueError, match="not one of"):
        resolve_kernel("flash", torch.device("cpu"))


def _cp_shard_step(rank, world, kernel, length):
    """This rank's contiguous shard through context_attention over the CP group: the output rows against full
    attention, and the bytes the graph saves against this rank's q, k, v, out and one fp32 lse per query row."""
    import torch.distributed as dist

    q, k, v, doc = _inputs(length)
    pos = torch.arange(length)
    shard = slice(rank * length // world, (rank + 1) * length // world)
    mine = [t[:, :, shard].clone().requires_grad_() for t in (q, k, v)]
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = context_attention(*mine, pos[shard], pos, doc[:, shard], doc, dist.group.WORLD, block=16, kernel=kernel)
    out.sum().backward()  # the backward's collectives run on every rank
    essential = sum(t.numel() * t.element_size() for t in (*mine, out)) + out[..., 0].numel() * 4
    error = _relative(out.detach(), _full_attention(q, k, v, pos, doc)[:, :, shard])
    return sum(saved), essential, error


@pytest.mark.parametrize("kernel", KERNELS)
def test_saved_tensors_are_this_ranks_shard_under_cp2(kernel):
    for length in (64, 128):
        for saved, essential, error in run_distributed(_cp_shard_step, 2, kernel, length):
            assert saved == essential and error < 1e-5, (length, saved, essential, error)
