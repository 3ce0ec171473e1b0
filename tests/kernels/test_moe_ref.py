"""MoE permute / grouped MLP / unpermute references against a float64 token loop."""

import pytest
import torch

from tests.kernels.kernel_naive import moe_naive, uneven_routing
from latentforge.kernels.moe import (
    grouped_mlp_ref,
    moe_experts,
    moe_experts_ref,
    moe_permute_ref,
    moe_unpermute_ref,
)


def make_moe_inputs(T, d, I, E, k, dtype=torch.float64, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen, dtype=torch.float64)
    w_up = torch.randn(E, I, d, generator=gen, dtype=torch.float64) / d**0.5
    w_down = torch.randn(E, d, I, generator=gen, dtype=torch.float64) / I**0.5
    idx = uneven_routing(T, k, E, gen, empty_expert=E - 1)
    w = torch.rand(T, k, generator=gen, dtype=torch.float64) + 0.1
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), idx.to(device), (w.float() if dtype != torch.float64 else w).to(device), cast(w_up), cast(w_down)


@pytest.mark.parametrize("T,d,I,E,k", [(13, 8, 12, 5, 2), (1, 4, 6, 3, 1), (20, 6, 4, 8, 3)])
@pytest.mark.parametrize("alignment", [1, 4, 16])
def test_moe_experts_ref_matches_token_loop(T, d, I, E, k, alignment):
    x, idx, w, w_up, w_down = make_moe_inputs(T, d, I, E, k, seed=T + alignment)
    y = moe_experts_ref(x, idx, w, w_up, w_down, alignment=alignment)
    torch.testing.assert_close(y, moe_naive(x, idx, w, w_up, w_down), rtol=0, atol=1e-12)


def test_permute_layout_padding_and_empty_expert():
    T, d, E, k, align = 9, 3, 4, 2, 4
    x, idx, w, _, _ = make_moe_inputs(T, d, 5, E, k, seed=1)
    xs, st = moe_permute_ref(x, idx, E, alignment=align)
    counts = torch.bincount(idx.flatten(), minlength=E)
    assert torch.equal(st.tokens_per_expert, counts) and int(counts[E - 1]) == 0
    assert torch.equal(st.tokens_per_expert_padded, (counts + align - 1) // align * align)
    assert st.num_rows == xs.shape[0] == int(st.tokens_per_expert_padded.sum())
    assert int(st.expert_offsets[E - 1]) == int(st.expert_offsets[E])  # the empty expert owns no rows
    for e in range(E):  # every expert block holds its tokens in token order, then zero rows
        lo, hi = int(st.expert_offsets[e]), int(st.expert_offsets[e + 1])
        toks = [t for t in range(T) for j in range(k) if int(idx[t, j]) == e]
        torch.testing.assert_close(xs[lo : lo + len(toks)], x[toks], rtol=0, atol=0)
        assert torch.count_nonzero(xs[lo + len(toks) : hi]) == 0
    # unpermute inverts permute
    torch.testing.assert_close(moe_unpermute_ref(xs, st, w), (x.unsqueeze(1) * w.unsqueeze(-1)).sum(1))


def test_grouped_mlp_linear_fn_is_used_for_every_gemm():
    x, idx, w, w_up, w_down = make_moe_inputs(10, 4, 6, 3, 2, seed=2)
    xs, st = moe_permute_ref(x, idx, 3, alignment=2)
    calls = []

    def linear(a, wt):
        calls.append(tuple(wt.shape))
        return (a @ wt.t()) * 2.0

    y = grouped_mlp_ref(xs, st.tokens_per_expert_padded, w_up, w_down, linear_fn=linear)
    assert len(calls) == 2 * 3  # an up and a down GEMM per expert, the empty one included
    y_plain = grouped_mlp_ref(xs, st.tokens_per_expert_padded, w_up, w_down)
    torch.testing.assert_close(y, 8.0 * y_plain)  # (2 h)^2 -> 4x, then the down GEMM doubles it


def test_moe_ref_gradients_match_token_loop():
    x, idx, w, w_up, w_down = make_moe_inputs(7, 4, 5, 4, 2, seed=3)
    leaves = [t.clone().requires_grad_() for t in (x, w, w_up, w_down)]
    leaves_n = [t.clone().requires_grad_() for t in (x, w, w_up, w_down)]
    g = torch.randn(7, 4, dtype=torch.float64)
    (moe_experts_ref(leaves[0], idx, leaves[1], leaves[2], leaves[3], alignment=4) * g).sum().backward()
    (moe_naive(leaves_n[0], idx, leaves_n[1], leaves_n[2], leaves_n[3]) * g).sum().backward()
    for a, b in zip(leaves, leaves_n):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-12)
    assert torch.count_nonzero(leaves[2].grad[3]) == 0  # the expert nobody chose gets zero gradient


def test_moe_bf16_dispatcher_on_cpu():
    x, idx, w, w_up, w_down = make_moe_inputs(16, 8, 8, 4, 2, dtype=torch.bfloat16, seed=4)
    y = moe_experts(x, idx, w, w_up, w_down, alignment=16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), moe_naive(x, idx, w, w_up, w_down), rtol=3e-2, atol=3e-2)


def test_moe_bad_inputs_raise():
    x, idx, w, w_up, w_down = make_moe_inputs(4, 4, 4, 3, 1)
    with pytest.raises(ValueError, match=r"topk_idx values must lie in \[0, 2\)"):
        moe_permute_ref(x, idx + 1, 2)
    with pytest.raises(ValueError, match="w_down must be"):
        moe_experts_ref(x, idx, w, w_up, w_down.transpose(1, 2)[:, :3])
