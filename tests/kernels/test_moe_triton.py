"""Triton MoE kernels (permute, grouped squared-ReLU MLP, unpermute) against the references."""

import pytest
import torch

from latentforge.kernels.moe import grouped_mlp_ref, moe_experts_ref, moe_permute_ref, moe_unpermute_ref, row_weights
from tests.kernels.test_moe_ref import make_moe_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
}


def _leaves(*ts):
    return [t.clone().requires_grad_() for t in ts]


def _assert_grads(fast, ref, tol):
    for a, b in zip(fast, ref):
        scale = max(1.0, float(b.grad.abs().max()))
        torch.testing.assert_close(a.grad.float() / scale, b.grad.float() / scale, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_triton_end_to_end(dtype):
    """Uneven loads, an expert with zero tokens, padding to 16, gradients for x, weights and routing."""
    from latentforge.kernels.moe_triton import grouped_mlp_triton, moe_permute_triton, moe_unpermute_triton
    from latentforge.kernels.moe import _routing_plan

    T, d, I, E, k = 20, 24, 40, 4, 2  # expert 1 spans two M tiles; d and I cross tile edges
    x, idx, w, w_up, w_down = make_moe_inputs(T, d, I, E, k, dtype=dtype, seed=0, device=DEVICE)
    lf = _leaves(x, w, w_up, w_down)
    lr = _leaves(x, w, w_up, w_down)
    state = _routing_plan(idx, E, 16)
    assert int(state.tokens_per_expert[E - 1]) == 0
    xs = moe_permute_triton(lf[0], state)
    ys = grouped_mlp_triton(xs, state.tokens_per_expert_padded, lf[2], lf[3], row_weights(state, lf[1]))
    y = moe_unpermute_triton(ys, state, None)
    y_r = moe_experts_ref(lr[0], idx, lr[1], lr[2], lr[3], alignment=16)
    torch.testing.assert_close(y, y_r, **TOL[dtype])
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_r * g).sum().backward()
    _assert_grads(lf, lr, TOL[dtype])


def test_unpermute_triton_weighted_and_permute_alignment_1():
    from latentforge.kernels.moe_triton import moe_permute_triton, moe_unpermute_triton
    from latentforge.kernels.moe import _routing_plan

    T, d, E, k = 9, 20, 5, 3
    x, idx, w, _, _ = make_moe_inputs(T, d, 4, E, k, dtype=torch.float32, seed=1, device=DEVICE)
    state = _routing_plan(idx, E, 1)
    xf, wf = _leaves(x, w)
    xr, wr = _leaves(x, w)
    xs = moe_permute_triton(xf, state)
    xs_r, _ = moe_permute_ref(xr, idx, E, 1)
    torch.testing.assert_close(xs, xs_r, rtol=0, atol=0)
    y = moe_unpermute_triton(xs * 2.0, state, wf)
    y_r = moe_unpermute_ref(xs_r * 2.0, state, wr)
    torch.testing.assert_close(y, y_r, **TOL[torch.float32])
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_r * g).sum().backward()
    _assert_grads([xf, wf], [xr, wr], TOL[torch.float32])


def test_grouped_mlp_triton_without_row_weight():
    from latentforge.kernels.moe_triton import grouped_mlp_triton

    E, I, d = 3, 24, 16
    counts = torch.tensor([5, 0, 21], device=DEVICE)
    gen = torch.Generator().manual_seed(2)
    xs = torch.randn(26, d, generator=gen).to(DEVICE)
    w_up = (torch.randn(E, I, d, generator=gen) / 4).to(DEVICE)
    w_down = (torch.randn(E, d, I, generator=gen) / 5).to(DEVICE)
    lf, lr = _leaves(xs, w_up, w_down), _leaves(xs, w_up, w_down)
    y = grouped_mlp_triton(lf[0], counts, lf[1], lf[2])
    y_r = grouped_mlp_ref(lr[0], counts, lr[1], lr[2])
    torch.testing.assert_close(y, y_r, **TOL[torch.float32])
    y.sum().backward()
    y_r.sum().backward()
    _assert_grads(lf, lr, TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("alignment", [16, 128])
def test_moe_triton_gpu_latent_shape(alignment):
    from latentforge.kernels.moe import moe_experts

    T, d, I, E, k = 2048, 1024, 2688, 64, 22
    x, idx, w, w_up, w_down = make_moe_inputs(T, d, I, E, k, dtype=torch.bfloat16, seed=3, device="cuda")
    lf, lr = _leaves(x, w, w_up, w_down), _leaves(x, w, w_up, w_down)
    y = moe_experts(lf[0], idx, lf[1], lf[2], lf[3], alignment=alignment)
    y_r = moe_experts_ref(lr[0], idx, lr[1], lr[2], lr[3], alignment=alignment)
    torch.testing.assert_close(y, y_r, **TOL[torch.bfloat16])
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_r * g).sum().backward()
    _assert_grads(lf, lr, TOL[torch.bfloat16])
