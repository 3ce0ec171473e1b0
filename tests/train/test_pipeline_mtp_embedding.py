"""Pipeline parallelism with MTP: the last stage holds its own copy of the embedding for the MTP block (stage.py),
so stage boundaries carry only (micro-batch index, hidden state).

Checked against one process (the tiny model with MoE and two MTP depths, fp32, gloo): a PP=2 1F1B run, a PP=3
GPipe run (whose first/last embedding group is a new two-rank group) and PP=2 x TP=2 give the single-process losses, grad norm
(the copy counted once) and every gradient, the embedding's included (the reference is the one-process model's
embedding gradient, LM and MTP paths together); the boundary carries one hidden state; the two copies are
bitwise equal after several AdamW steps; a PP=2 checkpoint holds the embedding once and loads into one process,
and a one-process checkpoint loads into both copies of a PP=2 run.
"""

import pytest
import torch

from tests.distributed import run_distributed

from .test_parallel_common import assert_same_training, load_unsharded, merged_states, one_thread, reference_run
from .test_parallel_common import restore, train_run

_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)

EMBEDDING = "backbone.embeddings.weight"


def _train_worker(rank, world_size, parallel, checkpoint_dir):
    return train_run(parallel, micro_batch_size=1, checkpoint_dir=checkpoint_dir)


@pytest.mark.parametrize(
    "parallel, world",
    [(dict(pp=2), 2), (dict(pp=3, pp_schedule="gpipe"), 3), (dict(pp=2, tp=2), 4)],
    ids=["pp2_1f1b", "pp3_gpipe", "pp2_x_tp2"],
)
def test_pipeline_with_mtp_matches_single_process(parallel, world, tmp_path):
    checkpoint_dir = str(tmp_path / "ckpt")
    results = run_distributed(_train_worker, world, parallel, checkpoint_dir, timeout=600)
    reference = reference_run()
    assert_same_training(reference, results)
    # the embedding's gradient and final value come from the last stage's copy (merged last): also the first's
    owners = [restore(state) for _, state in results if state]  # one rank per stage, in stage order
    first_state, last_state = owners[0], owners[-1]
    assert EMBEDDING in first_state and EMBEDDING in last_state
    assert torch.equal(first_state[EMBEDDING], last_state[EMBEDDING])
    assert torch.equal(first_state["grad:" + EMBEDDING], last_state["grad:" + EMBEDDING])
    # the checkpoint holds the embedding once, under its name, and loads into one process exactly
    state = {k: v for k, v in merged_states(restore(results)).items() if not k.startswith(("grad:", "init:"))}
    loaded = load_unsharded(checkpoint_dir).state_dict()
    assert sorted(loaded) == sorted(state)
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


def _copies_worker(rank, world_size, steps, checkpoint_dir):
    """A PP=2 run with FSDP inside each stage, started from that one-process checkpoint: this rank's embedding right
    after loading, what stage 0 sends, and the embedding after `steps` AdamW steps. Loading and training share one
    launch of 4 processes (each launch costs seconds of process start-up and runner building on 2 CPU cores)."""
    import torch.distributed.checkpoint as dcp

    from latentforge.model import HybridModel
    from latentforge.train.parallel import ParallelConfig, build_runner
    from latentforge.train.trainer import ModelState

    from .test_parallel_common import _full, global_batches, micro_batches_for, tiny_config

    cfg = tiny_config()
    torch.manual_seed(0)
    runner = build_runner(HybridModel(cfg), cfg, ParallelConfig(pp=2, dp_shard=2))
    (stage,), (stage_id,) = runner.stages, runner.stage_ids
    sent = []
    if stage_id == 0:
        stage.register_forward_hook(lambda module, args, output: sent.append([tuple(t.shape) for t in output]))
    dcp.load({"model": ModelState(runner.model_parts)}, checkpoint_id=checkpoint_dir)
    loaded = _full(runner.model_parts[0].backbone.embeddings.weight).numpy()
    params = [p for part in runner.model_parts for p in part.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=False)
    batch = global_batches(cfg, steps=1)[0]
    for _ in range(steps):
        optimizer.zero_grad()
        runner.forward_backward(micro_batches_for(batch, runner.dp_rank, runner.dp_size, 1))
        runner.clip_grad_norm_(1.0)
        optimizer.step()
    _, metas = runner._stage_metas(0, (1, 64))
    trained = _full(runner.model_parts[0].backbone.embeddings.weight)
    return stage_id, [tuple(t.shape) for t in metas], sent, loaded, trained.numpy()


def test_checkpoint_loads_into_both_copies_then_boundary_carries_only_hidden_and_copies_stay_equal(tmp_path):
    import torch.distributed.checkpoint as dcp

    from latentforge.model import HybridModel

    from .test_parallel_common import tiny_config

    torch.manual_seed(7)  # not the workers' seed 0: the loaded values are the checkpoint's, not a fresh init's
    model = HybridModel(tiny_config())
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(tmp_path), no_dist=True)
    want = model.backbone.embeddings.weight.detach()
    results = run_distributed(_copies_worker, 4, 3, str(tmp_path), timeout=600)
    assert {stage_id for stage_id, *_ in results} == {0, 1}
    by_stage = {}
    for stage_id, metas, sent, loaded, trained in results:
        assert torch.equal(torch.from_numpy(loaded), want)  # the one-process checkpoint loads into both copies
        assert metas == [(1,), (1, 64, 128)]  # (micro-batch index, hidden): no MTP embeddings
        if stage_id == 0:
            assert sent and all(shapes == [(1,), (1, 64, 128)] for shapes in sent), sent
        by_stage.setdefault(stage_id, []).append(torch.from_numpy(trained))
    first, last = by_stage[0][0], by_stage[1][0]
    assert not torch.equal(first, want)  # it trained
    for embedding in by_stage[0] + by_stage[1]:
        assert torch.equal(embedding, first)
    assert torch.equal(last, first)
