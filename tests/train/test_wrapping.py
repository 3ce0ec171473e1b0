"""Activation checkpointing and compile are applied in place: same forward, same parameter names, recomputed."""

import torch

from latentforge.model import HybridModel
from latentforge.train.parallel.wrapping import wrap_unit

from .test_parallel_common import tiny_config


def _run(block, x, seq_idx) -> tuple:
    """(tensors saved for the backward, in_proj calls over forward + backward)."""
    saved, calls = [], []
    handle = block.mixer.in_proj.register_forward_hook(lambda *args: calls.append(1))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        out, _ = block(x, seq_idx=seq_idx)
    out.square().sum().backward()
    handle.remove()
    return len(saved), len(calls)


def test_checkpointed_block_keeps_its_forward_and_names_and_recomputes():
    torch.manual_seed(0)
    model = HybridModel(tiny_config())
    block = model.backbone.layers[0]
    forward, names = block.forward, [n for n, _ in model.named_parameters()]
    x = torch.randn(2, 8, model.cfg.hidden_size, requires_grad=True)
    seq_idx = torch.zeros(2, 8, dtype=torch.int32)
    saved_plain, calls = _run(block, x, seq_idx)
    assert calls == 1 and saved_plain > 10
    plain_grad = x.grad.clone()
    x.grad = None
    wrap_unit("block", block, {block.kind}, compile_blocks=False)
    assert block.forward == forward and "forward" not in block.__dict__
    assert [n for n, _ in model.named_parameters()] == names
    saved, calls = _run(block, x, seq_idx)
    assert calls == 2 and saved <= 2  # only the block's input is kept; the backward ran the mixer again
    torch.testing.assert_close(x.grad, plain_grad, rtol=0, atol=0)
