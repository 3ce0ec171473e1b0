"""rms_norm_ref / gated_rms_norm_ref against float64 loops."""

import pytest
import torch

from tests.kernels.kernel_naive import gated_rms_norm_naive, rms_norm_naive
from latentforge.kernels.rmsnorm import gated_rms_norm, gated_rms_norm_ref, rms_norm, rms_norm_ref


@pytest.mark.parametrize("shape", [(3, 16), (2, 5, 24), (1, 1, 7)])
def test_rms_norm_ref_fp64(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 3
    w = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    torch.testing.assert_close(rms_norm_ref(x, w), rms_norm_naive(x, w), rtol=0, atol=1e-12)
    torch.testing.assert_close(rms_norm_ref(x, w, eps=0.3), rms_norm_naive(x, w, eps=0.3), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape,group", [((3, 16), 4), ((2, 5, 24), 8), ((2, 12), 12)])
def test_gated_rms_norm_ref_fp64(shape, group):
    gen = torch.Generator().manual_seed(group)
    x, z = (torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(2))
    w = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        gated_rms_norm_ref(x, z, w, group), gated_rms_norm_naive(x, z, w, group), rtol=0, atol=1e-12
    )


def test_norm_refs_gradcheck_and_bf16_dispatch():
    gen = torch.Generator().manual_seed(0)
    x, z = (torch.randn(2, 3, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = torch.randn(8, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: gated_rms_norm_ref(a, b, c, 4), (x, z, w))
    assert torch.autograd.gradcheck(lambda a, c: rms_norm_ref(a, c), (x, w))
    xb, zb = x.detach().bfloat16(), z.detach().bfloat16()
    out = gated_rms_norm(xb, zb, w.detach().float(), 4)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), gated_rms_norm_naive(xb, zb, w.detach(), 4), rtol=1.6e-2, atol=1e-2)
    assert rms_norm(xb, w.detach().float()).dtype == torch.bfloat16


def test_gated_rms_norm_bad_group_raises():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm_ref(x, x, torch.ones(10), 4)
