"""BF16 mixed precision through the runner (precision.param_dtype), on CPU: FSDP2's MixedPrecisionPolicy over gloo,
autocast without FSDP. The weights stay fp32 masters, the GEMMs see bf16, the MoE router computes in fp32, and the
loss stays within bf16 rounding of the fp32 run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from tests.train.test_parallel_common import global_batches, micro_batches_for, portable, restore, tiny_config

BF16 = {"param_dtype": "bfloat16"}


def _observed_run(parallel: dict, precision: dict | None, steps: int = 2, micro_batch_size: int = 2):
    """Two AdamW steps; returns (losses, dtypes seen inside the forward, router fp32 check, param/grad dtypes)."""
    from latentforge.model import HybridModel
    from latentforge.model.moe import Router
    from latentforge.train.parallel import ParallelConfig, build_runner

    cfg = tiny_config()
    torch.manual_seed(0)
    model = HybridModel(cfg)
    q_proj = next(m.q_proj for m in model.modules() if hasattr(m, "q_proj"))
    router = next(m for m in model.modules() if isinstance(m, Router))
    seen = {}

    def on_q_proj(module, args, output):
        seen["q_proj_weight"] = str(module.weight.dtype)  # the gathered (cast) weight under FSDP
        seen["q_proj_output"] = str(output.dtype)

    def on_router(module, args, output):
        x = args[0]
        with torch.autocast(x.device.type, enabled=False):
            expected = torch.sigmoid(F.linear(x.float(), module.weight.float()))
        seen["router_weight"] = str(module.weight.dtype)
        seen["router_exact_fp32"] = bool(torch.equal(output[0].scores, expected))  # (Routing, weights)

    q_proj.register_forward_hook(on_q_proj)
    router.register_forward_hook(on_router)
    runner = build_runner(model, cfg, ParallelConfig(**parallel), precision)
    params = [p for part in runner.model_parts for p in part.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    losses = []
    for batch in global_batches(cfg, steps=steps):
        optimizer.zero_grad()
        result = runner.forward_backward(micro_batches_for(batch, runner.dp_rank, runner.dp_size, micro_batch_size))
        seen["grad_dtypes"] = sorted({str(p.grad.dtype) for p in params if p.grad is not None})
        optimizer.step()
        losses.append(result["loss"])
    seen["param_dtypes"] = sorted({str(p.dtype) for p in params})
    return portable((losses, seen))


def _spawned(rank, world_size, parallel, precision, micro_batch_size=2):
    return _observed_run(parallel, precision, micro_batch_size=micro_batch_size)


def _run(parallel, precision):
    return restore(_observed_run(parallel, precision))


@pytest.fixture(scope="module")
def fp32_losses():
    return _run({}, None)[0]


def test_one_process_bf16_autocast(fp32_losses):
    losses, seen = _run({}, BF16)
    assert seen["q_proj_output"] == "torch.bfloat16"  # the GEMM ran in bf16 under autocast
    assert seen["router_exact_fp32"]  # ... but the router did not
    assert seen["param_dtypes"] == ["torch.float32"] and seen["grad_dtypes"] == ["torch.float32"]
    assert losses == pytest.approx(fp32_losses, rel=2e-2)
    assert losses != pytest.approx(fp32_losses, rel=1e-6)  # bf16 really changed the arithmetic


def test_auto_is_fp32_on_cpu(fp32_losses):
    losses, seen = _run({}, {"param_dtype": "auto"})
    assert seen["q_proj_output"] == "torch.float32"
    assert losses == fp32_losses


def test_fsdp2_mixed_precision_policy(fp32_losses):
    results = run_distributed(_spawned, 2, {"dp_shard": 2}, BF16)
    for losses, seen in map(restore, results):
        assert seen["q_proj_weight"] == "torch.bfloat16"  # FSDP2 gathered the weight in bf16
        assert seen["q_proj_output"] == "torch.bfloat16"
        assert seen["router_weight"] == "torch.float32" and seen["router_exact_fp32"]  # the router's own fp32 unit
        assert seen["param_dtypes"] == ["torch.float32"]  # sharded fp32 masters
        assert seen["grad_dtypes"] == ["torch.float32"]
        assert losses == pytest.approx(fp32_losses, rel=2e-2)


def test_pipeline_bf16_matches_one_process_autocast():
    one, _ = _run({}, BF16)
    results = [restore(r) for r in run_distributed(_spawned, 2, {"pp": 2}, BF16)]
    for losses, _ in results:
        assert losses == pytest.approx(one, rel=1e-4)  # the same bf16 arithmetic, split over two stages


def test_bad_dtype_is_named():
    from latentforge.train.precision import PrecisionConfig, PrecisionConfigError

    with pytest.raises(PrecisionConfigError, match="param_dtype"):
        PrecisionConfig(param_dtype="fp16")


def test_pipeline_over_fsdp_sends_bf16_activations(fp32_losses):
    """PP2 x FSDP2 (4 processes): FSDP casts the weights, so the activations between stages are bf16 and the
    pipeline's stage metadata must say so (declared fp32, the losses leave bf16 tolerance of the fp32 run)."""
    results = [restore(r) for r in run_distributed(_spawned, 4, {"pp": 2, "dp_shard": 2}, BF16, 1)]
    for losses, seen in results:
        assert seen["param_dtypes"] == ["torch.float32"]
        assert losses == pytest.approx(fp32_losses, rel=2e-2)
