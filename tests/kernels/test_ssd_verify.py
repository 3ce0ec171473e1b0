"""Draft verification's SSD step (kernels/ssd_verify.py) against the float64 loop of kernel_naive: the outputs of
s tokens from a cached state, and the state after the token each row keeps (what rollback commits)."""

import pytest
import torch

from latentforge.kernels import ssd_verify as ssd_verify_module
from latentforge.kernels.ssd_verify import LoopTokenStates, SSMTokenStates, ssd_verify
from tests.kernels.kernel_naive import ssd_naive
from tests.kernels.test_ssd_ref import make_ssd_inputs


@pytest.fixture(params=["closed form", "token loop"])
def verify_path(request, monkeypatch):
    """Both ways ssd_verify computes (it picks by the size of the states): forced by the threshold."""
    closed = request.param == "closed form"
    monkeypatch.setattr(ssd_verify_module, "CLOSED_FORM_MIN_ELEMENTS", 0 if closed else 1 << 62)
    return SSMTokenStates if closed else LoopTokenStates


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("head,new", [(7, 1), (3, 5), (0, 4)])
def test_ssd_verify_outputs_and_the_kept_state_follow_the_recurrence(dtype, tol, head, new, verify_path):
    """Grouped heads (4 heads, 2 groups), D skip, a random state entering; each row keeps a different token."""
    inputs = make_ssd_inputs(3, head + new, 4, 3, 2, 5, dtype=torch.float64, seed=head + 11)
    x, dt, A, B, C, D, init = (inputs[key] for key in ("x", "dt", "A", "B", "C", "D", "init"))
    y_full, _ = ssd_naive(x, dt, A, B, C, D, initial_state=init)
    _, state = ssd_naive(x[:, :head], dt[:, :head], A, B[:, :head], C[:, :head], D, initial_state=init)
    tail = [t[:, head:].to(dtype) for t in (x, dt, B, C)]
    low = torch.float32 if dtype != torch.float64 else dtype  # A, D and the state stay fp32, as in the mixer
    entering = state.to(low)
    y, token_states = ssd_verify(tail[0], tail[1], A.to(low), tail[2], tail[3], D.to(low), state=entering)
    assert y.dtype == dtype and isinstance(token_states, verify_path)
    torch.testing.assert_close(y.double(), y_full[:, head:], rtol=tol, atol=tol)
    keep = torch.tensor([new - 1, 0, (new - 1) // 2])
    kept = token_states.select(keep)
    assert kept.shape == (3, 4, 3, 5) and kept.dtype == low
    for row, t in enumerate(keep.tolist()):
        end = head + t + 1
        _, after = ssd_naive(x[:, :end], dt[:, :end], A, B[:, :end], C[:, :end], D, initial_state=init)
        torch.testing.assert_close(kept[row].double(), after[row], rtol=tol, atol=tol)
    torch.testing.assert_close(token_states.all()[torch.arange(3), keep], kept, rtol=0, atol=0)
    torch.testing.assert_close(entering, state.to(low), rtol=0, atol=0)  # the slot's state is only read


def test_ssd_verify_names_a_bad_state():
    inputs = make_ssd_inputs(1, 2, 4, 3, 2, 5)
    with pytest.raises(ValueError, match="initial_state must be"):
        ssd_verify(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], state=torch.zeros(1, 4, 3, 4))


def test_ssd_verify_stays_finite_where_the_decay_underflows(verify_path):
    """dt * A of -250 per token: exp(L_t - L_u) over u > t would overflow; those entries are masked, not multiplied."""
    inputs = make_ssd_inputs(2, 4, 4, 3, 2, 5, dtype=torch.float32, seed=5)
    dt = torch.full_like(inputs["dt"], 50.0)
    A = torch.full_like(inputs["A"], -5.0)
    state = torch.randn(2, 4, 3, 5)
    y, token_states = ssd_verify(inputs["x"], dt, A, inputs["B"], inputs["C"], inputs["D"], state=state)
    y_naive, _ = ssd_naive(
        inputs["x"].double(),
        dt.double(),
        A.double(),
        inputs["B"].double(),
        inputs["C"].double(),
        inputs["D"].double(),
        initial_state=state.double(),
    )
    torch.testing.assert_close(y.double(), y_naive, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(token_states.all()).all()
