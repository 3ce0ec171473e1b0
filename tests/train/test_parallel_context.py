"""Context parallelism at scale: the blockwise attention against PyTorch's SDPA with the model's dense mask, the
load-balanced token order, what the attention keeps for its backward (linear in the sequence, no scores), and
whole training steps under CP2/CP4 (load-balanced and contiguous, with TP) against one process on 512 tokens of
packed documents: a row that is one document (states travel through every chunk) and rows whose documents start
inside chunks, exactly at chunk boundaries and one token after them.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed

from .test_parallel_common import full_grads, one_thread, portable, relative_error, restore, tiny_config

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

SEQ_LEN = 512
BLOCK = 48  # not a divisor of the chunks: blocks straddle chunk and document boundaries


def _documents(seq_len: int, cuts_per_row: list) -> torch.Tensor:
    seq = torch.zeros(len(cuts_per_row), seq_len, dtype=torch.int32)
    for row, cuts in enumerate(cuts_per_row):
        for cut in cuts:
            seq[row, cut:] += 1
    return seq


def _attention_inputs(seq_len, dtype=torch.float64, heads=4, kv_heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, seq_len, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(2, kv_heads, seq_len, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(2, kv_heads, seq_len, d, generator=g, dtype=dtype).requires_grad_()
    seq = _documents(seq_len, [[], [1, seq_len // 3, seq_len // 3 + 1, seq_len - 1]])
    return q, k, v, seq


def _sdpa_reference(q, k, v, seq):
    from latentforge.model.attention import document_causal_mask

    return F.scaled_dot_product_attention(q, k, v, attn_mask=document_causal_mask(seq), enable_gqa=True)


@pytest.mark.parametrize("block", [16, 37, 300])
def test_blockwise_attention_matches_sdpa(block):
    from latentforge.train.parallel.cp_attention import context_attention

    q, k, v, seq = _attention_inputs(200)
    pos = torch.arange(200)
    out = context_attention(q, k, v, pos, pos, seq, seq, None, block=block)
    want = _sdpa_reference(q, k, v, seq)
    assert (out - want).abs().max() < 1e-12
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want, (q, k, v), grad)
    for name, a, b in zip("qkv", got, ref):
        assert (a - b).abs().max() < 1e-12, name


def test_blockwise_attention_in_a_permuted_token_order():
    """Queries and keys in the load-balanced order (positions not ascending): the same rows as SDPA's."""
    from latentforge.train.parallel.cp_attention import context_attention
    from latentforge.train.parallel.token_order import TokenOrder

    q, k, v, seq = _attention_inputs(256)
    order = TokenOrder.choose(256, cp=4, load_balance=True)
    pos = order.all_positions()
    out = context_attention(
        q[:, :, pos], k[:, :, pos], v[:, :, pos], pos, pos, seq[:, pos], seq[:, pos], None, block=40
    )
    assert (out - _sdpa_reference(q, k, v, seq)[:, :, pos]).abs().max() < 1e-12


def _saved_bytes(attention, seq_len: int) -> tuple:
    """(bytes the autograd graph keeps for the backward, bytes of q, k, v, out and a float per query row)."""
    q, k, v, seq = _attention_inputs(seq_len, dtype=torch.float32)
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attention(q, k, v, seq)
    essential = sum(t.numel() * t.element_size() for t in (q, k, v, out)) + q[..., 0].numel() * 4
    return sum(total), essential


def test_blockwise_attention_saves_linear_memory():
    """The backward keeps this rank's q, k, v, the output and the log-sum-exp: nothing of size s x s (SDPA with
    the model's dense mask keeps the (b, 1, s, s) mask, more than all of that at 1024 tokens)."""
    from latentforge.train.parallel.cp_attention import context_attention

    def blockwise(q, k, v, seq):
        pos = torch.arange(seq.shape[1])
        return context_attention(q, k, v, pos, pos, seq, seq, None, block=64)

    for length in (512, 1024):
        saved, essential = _saved_bytes(blockwise, length)
        assert saved == essential, (length, saved, essential)
    dense, _ = _saved_bytes(_sdpa_reference, 1024)
    assert dense > 2 * 1024 * 1024 > saved


def test_token_order_covers_the_sequence_and_balances_causal_work():
    from latentforge.train.parallel.token_order import TokenOrder

    order = TokenOrder.choose(64, cp=4, load_balance=True)
    assert order.load_balanced and order.chunks_of(1) == [1, 6] and order.owner(6) == (1, 1)
    assert sorted(order.all_positions().tolist()) == list(range(64))
    work = [int((order.positions(r) + 1).sum()) for r in range(4)]  # query at position p sees p + 1 keys
    assert len(set(work)) == 1, work
    contiguous = TokenOrder.choose(64, cp=4, load_balance=False)
    unbalanced = [int((contiguous.positions(r) + 1).sum()) for r in range(4)]
    assert unbalanced[-1] > 6 * unbalanced[0]
    assert not TokenOrder.choose(36, cp=4, load_balance=True).load_balanced  # 36 tokens do not make 8 chunks
    assert not TokenOrder.choose(64, cp=4, load_balance=True, min_chunk=9).load_balanced  # chunks < conv history


def _batch(cfg, seq_len=SEQ_LEN):
    g = torch.Generator().manual_seed(7)
    eighth = seq_len // 8
    # row 0: one document; row 1: starts inside chunks, exactly at chunk boundaries and one token after them
    seq = _documents(seq_len, [[], [eighth - 5, 2 * eighth, 3 * eighth + 1, seq_len // 2, 6 * eighth + 3]])
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=g)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    labels[1, 100:110] = -100
    return {"input_ids": ids, "labels": labels, "seq_idx": seq}


def _one_step(rank, world_size, parallel):
    from latentforge.model import HybridModel
    from latentforge.train.parallel import ParallelConfig, build_runner

    cfg = tiny_config()
    torch.manual_seed(0)
    runner = build_runner(HybridModel(cfg), cfg, ParallelConfig(**parallel, attention_block=BLOCK))
    result = runner.forward_backward([_batch(cfg)])
    grads = full_grads(runner.model_parts)
    return portable((result["loss"], result["lm_loss"], grads if rank == 0 else None))


LAYOUTS = {
    "cp2_load_balanced": (dict(cp=2), 2),
    "cp2_contiguous": (dict(cp=2, cp_load_balance=False), 2),
    "cp4_load_balanced": (dict(cp=4), 4),
    "cp2_x_tp2": (dict(cp=2, tp=2), 4),
}

_REFERENCE = []


def _one_step_per_layout(rank, world_size, layouts):
    # every layout of one world size in one launch of the ranks: a launch costs seconds on 2 CPU cores
    return {name: _one_step(rank, world_size, parallel) for name, parallel in layouts.items()}


@pytest.mark.parametrize("world", sorted({world for _, world in LAYOUTS.values()}))
def test_context_parallel_step_matches_single_process(world):
    if not _REFERENCE:
        _REFERENCE.append(restore(_one_step(0, 1, {})))
    want_loss, want_lm, want_grads = _REFERENCE[0]
    layouts = {name: parallel for name, (parallel, layout_world) in LAYOUTS.items() if layout_world == world}
    per_rank = restore(run_distributed(_one_step_per_layout, world, layouts, timeout=600))
    for name in layouts:
        loss, lm, grads = per_rank[0][name]
        assert abs(loss - want_loss) <= 1e-5 * abs(want_loss) and abs(lm - want_lm) <= 1e-5 * abs(want_lm), name
        worst = max((relative_error(grads[key], value), key) for key, value in want_grads.items())
        assert worst[0] <= 1e-5, (name, worst)
