"""`parallel.compile=true`: every block's forward under torch.compile trains like eager (loss and gradients).

The suite captures with the `aot_eager` backend (dynamo graph capture + AOT autograd, no code generation): the
same graphs inductor gets, in seconds instead of minutes on 2 CPU cores. Inductor itself was checked by hand on
CPU (loss 4e-8, gradients 9e-7 relative); GPU runs use inductor (the default)."""

import functools
import os

import pytest
import torch

from tests.train.test_parallel_common import global_batches, micro_batches_for, tiny_config


def _loss_and_grads(compile_blocks: bool):
    from latentforge.model import HybridModel
    from latentforge.train.parallel import ParallelConfig, build_runner

    cfg = tiny_config()
    torch.manual_seed(0)
    model = HybridModel(cfg)
    runner = build_runner(model, cfg, ParallelConfig(compile=compile_blocks))
    batch = global_batches(cfg, steps=1)[0]
    result = runner.forward_backward(micro_batches_for(batch, 0, 1, 2))
    return result["loss"], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, model


def test_compiled_blocks_match_eager(monkeypatch):
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    eager_loss, eager_grads, _ = _loss_and_grads(False)
    from torch._dynamo.utils import counters

    counters.clear()
    loss, grads, _ = _loss_and_grads(True)
    assert counters["stats"]["unique_graphs"] > 0, "nothing was captured by torch.compile"
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager_grads.keys() == grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_runs_keep_inductors_cache_in_the_project_cache_dir(monkeypatch, tmp_path):
    from latentforge.data.config import use_persistent_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LATENTFORGE_CACHE", str(tmp_path))
    assert use_persistent_compile_cache() == str(tmp_path / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")  # an explicit choice wins
    assert use_persistent_compile_cache() == "/somewhere/else"
