"""The core test of the parallel layer: two AdamW steps (grad clipping, expert-bias update) of the tiny hybrid model
with MoE and MTP, in float32 over gloo, give the single-process losses, grad norms, expert loads and final
parameters and buffers (gathered to full tensors) within 1e-5 relative, under every parallel dimension and two
4-process combinations. Two layouts also save a DCP checkpoint that a single process loads back exactly, and two
build the model on the meta device (the runner initialises it unit by unit, so the values must not depend on the
layout either: they are compared with a meta-built single-process run).

One spawn per layout; the comparison runs in the test. The batches hold packed documents whose boundaries fall
inside and exactly at the context-/sequence-parallel cuts, and ignored labels.
"""

import pytest
import torch

from tests.distributed import run_distributed

from .test_parallel_common import (
    assert_same_training,
    load_unsharded,
    merged_states,
    one_thread,
    reference_run,
    restore,
    train_run,
)

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


_REFERENCES = {}


def reference(meta: bool):
    """The single-process run, computed once per module (CPU-built and meta-built)."""
    if meta not in _REFERENCES:
        _REFERENCES[meta] = reference_run(meta=meta)
    return _REFERENCES[meta]


def _worker(rank, world_size, runs):
    """Every layout of one world size in one launch of the ranks (a launch costs seconds on 2 CPU cores); each
    train_run builds its own runner from seed 0."""
    results = {}
    for name, (parallel, micro_batch_size, checkpoint_dir, meta, probe_guards) in runs.items():
        if probe_guards:
            _expect_different_weights_refused(rank, parallel)
            _expect_uneven_micro_batch_counts_refused(rank, parallel)
        results[name] = train_run(parallel, micro_batch_size=micro_batch_size, checkpoint_dir=checkpoint_dir, meta=meta)
    return results


def _expect_different_weights_refused(rank, parallel):
    from latentforge.model import HybridModel
    from latentforge.train.parallel import LayoutError, ParallelConfig, build_runner

    from .test_parallel_common import tiny_config

    cfg = tiny_config()
    torch.manual_seed(rank)  # a different model on every rank
    with pytest.raises(LayoutError, match="weights differ between ranks"):
        build_runner(HybridModel(cfg), cfg, ParallelConfig(**parallel))


def _expect_uneven_micro_batch_counts_refused(rank, parallel):
    from latentforge.model import HybridModel
    from latentforge.train.parallel import LayoutError, ParallelConfig, build_runner

    from .test_parallel_common import global_batches, micro_batches_for, tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    runner = build_runner(HybridModel(cfg), cfg, ParallelConfig(**parallel))
    micro = micro_batches_for(global_batches(cfg, steps=1)[0], runner.dp_rank, runner.dp_size, 1)
    with pytest.raises(LayoutError, match="different numbers of micro-batches"):
        runner.forward_backward(micro[: 1 + rank])


def _check_checkpoint(path, results):
    """A single process loads the sharded checkpoint into the unsharded names: every tensor equal."""
    state = {k: v for k, v in merged_states(restore(results)).items() if not k.startswith(("grad:", "init:"))}
    loaded = load_unsharded(path).state_dict()
    assert sorted(loaded) == sorted(state)
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


LAYOUTS = {
    # name: (parallel config, world size, micro-batch size per data-parallel rank, save a checkpoint, meta-built)
    "tp2": (dict(tp=2), 2, 2, True, False),
    "ep2": (dict(ep=2), 2, 1, False, True),
    "pp2_interleaved": (dict(pp=2, pp_schedule="interleaved_1f1b", pp_virtual_stages=2), 2, 1, False, False),
    "cp2": (dict(cp=2), 2, 2, False, False),
    "fsdp2_checkpointed": (dict(dp_shard=2, activation_checkpoint="all"), 2, 1, False, False),
    "fsdp2_x_tp2": (dict(dp_shard=2, tp=2), 4, 2, False, True),
    "pp2_x_ep2": (dict(pp=2, ep=2), 4, 1, True, False),
}


@pytest.mark.parametrize("world", sorted({world for _, world, *_ in LAYOUTS.values()}))
def test_parallel_layouts_match_single_process(world, tmp_path):
    runs = {
        name: (parallel, micro_batch_size, str(tmp_path / name) if save else None, meta, name == "fsdp2_checkpointed")
        for name, (parallel, layout_world, micro_batch_size, save, meta) in LAYOUTS.items()
        if layout_world == world
    }
    per_rank = run_distributed(_worker, world, runs, timeout=600)
    for name, (_, _, checkpoint_dir, meta, _) in runs.items():
        results = [by_layout[name] for by_layout in per_rank]
        try:
            worst_grad, worst_param = assert_same_training(reference(meta), results)
            if checkpoint_dir is not None:
                _check_checkpoint(checkpoint_dir, results)
        except AssertionError as error:
            raise AssertionError(f"layout {name}: {error}") from error
        print(
            f"{name}: worst gradient {worst_grad[0]:.1e} ({worst_grad[1]}), "
            f"worst parameter {worst_param[0]:.1e} ({worst_param[1]})"
        )
