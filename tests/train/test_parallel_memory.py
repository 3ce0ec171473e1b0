"""The plan's activation memory (train/parallel/memory.py) against what a training step really keeps for its
backward: every tensor saved by autograd during one forward (torch.autograd.graph.saved_tensors_hooks, each
storage counted once, parameters left out), on one process with and without activation checkpointing and on a
rank of CP2 and TP2, two sequence lengths. The estimate must be within 20%; and the plan must show the drop that
CP brings (per rank about 1/cp) and the dense mask of one process growing with s^2.
"""

import pytest
import torch

from tests.distributed import run_distributed

from .test_parallel_common import one_thread, tiny_config

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _batch(cfg, seq_len):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, cfg.vocab_size, (2, seq_len), generator=g)
    seq = torch.zeros(2, seq_len, dtype=torch.int32)
    seq[1, seq_len // 3 :] = 1
    return {"input_ids": ids, "labels": torch.roll(ids, -1, 1), "seq_idx": seq}


def measured_and_planned(rank, world_size, parallel, seq_len, model_overrides):
    from latentforge.model import HybridModel
    from latentforge.train.parallel import ParallelConfig, build_runner
    from latentforge.train.parallel.memory import plan_activations

    cfg = tiny_config(**model_overrides)
    torch.manual_seed(0)
    pc = ParallelConfig(**parallel)
    runner = build_runner(HybridModel(cfg), cfg, pc)
    saved = {}

    def pack(t):
        # parameters (FSDP's unsharded ones included) are weights, not activations
        if not isinstance(t, torch.nn.Parameter) and not hasattr(t, "to_local"):
            storage = t.untyped_storage()
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        runner.forward_backward([_batch(cfg, seq_len)])
    plan = plan_activations(cfg, pc, runner.layout, seq_len, micro_batch_size=2)
    return sum(saved.values()), plan.saved


CASES = {
    # name: (parallel config, world size, model config overrides)
    "single": (dict(), 1, {}),
    "single_no_moe_latent": (dict(), 1, dict(moe_latent_size=None)),  # experts at full hidden width (nano)
    "single_checkpoint_mamba_moe": (dict(activation_checkpoint="mamba,moe"), 1, {}),
    "single_checkpoint_all": (dict(activation_checkpoint="all"), 1, {}),
    "cp2": (dict(cp=2), 2, {}),
    "tp2": (dict(tp=2), 2, {}),
}


def measured_and_planned_at_each_length(rank, world_size, parallel, seq_lens, model_overrides):
    # every sequence length in one launch of the ranks: a launch costs seconds of process start-up on 2 CPU cores
    return [measured_and_planned(rank, world_size, parallel, seq_len, model_overrides) for seq_len in seq_lens]


@pytest.mark.parametrize("name", list(CASES))
def test_planned_activation_memory_within_20_percent(name):
    parallel, world, model_overrides = CASES[name]
    seq_lens = (256, 512)
    if world == 1:
        per_rank = [measured_and_planned_at_each_length(0, 1, parallel, seq_lens, model_overrides)]
    else:
        per_rank = run_distributed(measured_and_planned_at_each_length, world, parallel, seq_lens, model_overrides)
    for by_length in per_rank:
        for seq_len, (measured, planned) in zip(seq_lens, by_length, strict=True):
            print(
                f"{name} s={seq_len}: measured {measured / 2**20:.2f} MiB, planned {planned / 2**20:.2f} MiB "
                f"({planned / measured - 1:+.1%})"
            )
            assert abs(planned - measured) <= 0.2 * measured, (name, seq_len, measured, planned)


def test_plan_scales_with_context_parallelism():
    from latentforge.train.parallel import ParallelConfig
    from latentforge.train.parallel.config import validate_layout
    from latentforge.train.parallel.memory import plan_activations

    cfg = tiny_config()

    def plan(pc, world, seq_len=8192):
        return plan_activations(cfg, pc, validate_layout(cfg, pc, world), seq_len, 1)

    one = plan(ParallelConfig(), 1)
    assert plan(ParallelConfig(), 1, 16384).per_layer["attention"] > 3.5 * one.per_layer["attention"]  # (s x s)
    blockwise = plan(ParallelConfig(tp=2), 2)  # the parallel forwards: attention linear in s
    assert plan(ParallelConfig(tp=2), 2, 16384).per_layer["attention"] == 2 * blockwise.per_layer["attention"]
    cp2, cp4 = plan(ParallelConfig(cp=2), 2), plan(ParallelConfig(cp=4), 4)
    assert cp2.saved < one.saved / 2  # CP splits every kind and drops the dense mask
    assert cp4.saved == pytest.approx(cp2.saved / 2, rel=1e-6)


def test_dry_run_of_the_million_token_layout(capsys):
    """super_120b_long (TP2 / CP64 / EP64, 1,048,576 tokens): the plan with its activation checkpointing fits an
    80 GB GPU; without checkpointing it says by how much it does not."""
    from latentforge.train.pretrain import main

    assert main(["recipe=super_120b_long", "--dry-run", "--world-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "cp 64, tp 2, ep 64" in out and "1048576 tokens" in out
    assert "fits an 80 GB GPU" in out and "NOT" not in out
    assert (
        main(["recipe=super_120b_long", "--dry-run", "--world-size", "128", "parallel.activation_checkpoint=none"]) == 0
    )
    assert "does NOT fit an 80 GB GPU" in capsys.readouterr().out
