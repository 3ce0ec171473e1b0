"""The whole asynchronous loop on a local Ray (one ray.init for the module): trainer, rollout worker with MTP
drafting, reward worker; staleness bound, mismatch at staleness 0, failing reward functions, checkpoint/resume
with no prompt skipped or trained twice, both weight-sync paths."""

import json
import os
import shutil

import pytest

ray = pytest.importorskip("ray")

from latentforge.data.config import TokenizerConfig  # noqa: E402
from latentforge.rl.config import GRPOConfig  # noqa: E402
from latentforge.rl.loop import GRPOLoop  # noqa: E402
from latentforge.rl.trainer import state_digest  # noqa: E402
from tests.rl.helpers import micro_model_cfg  # noqa: E402
from latentforge.train.config import OptimConfig  # noqa: E402
from latentforge.train.export import load_model_from_checkpoint  # noqa: E402

PLUGINS = "tests.rl.reward_plugins"


def loop_config(run_dir, **overrides):
    values = dict(
        steps=4,
        stop_at_step=3,
        groups_per_step=2,
        max_staleness=1,
        checkpoint_interval=2,
        seed=0,
        filter_zero_advantage=False,
        filter_overlong=False,
        run_dir=run_dir,
        wandb={"enabled": False},
        rollout={"group_size": 2, "sampling": {"max_new_tokens": 8}, "engine": {"draft_tokens": 2, "max_batch": 8}},
        trainer={"micro_batch_size": 4},
        reward={
            "task_weight": 0.0,
            "functions": [
                {"target": f"{PLUGINS}:parity", "isolation": "inline"},
                {"target": f"{PLUGINS}:raises", "isolation": "inline", "weight": 0.0},
                {"target": f"{PLUGINS}:hang_once", "isolation": "process", "timeout_s": 0.5, "weight": 0.0},
            ],
        },
        prompts={
            "tasks": [{"name": "arithmetic", "num": 300}],
            "eval_tasks": [{"name": "arithmetic", "num": 2, "partial_credit": 0.5}],
        },
        eval_samples=1,
    )
    values.update(overrides)
    return GRPOConfig(**values)


def make_loop(cfg, lines):
    return GRPOLoop(
        cfg,
        micro_model_cfg(4096),
        OptimConfig(lr=1e-3, schedule="constant"),
        tokenizer_spec=vars(TokenizerConfig()),
        run_dir=cfg.run_dir,
        task_seed=1234,
        print_fn=lines.append,
    )


def read_steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "trained_groups" in r]


def test_async_loop_resume_and_sync_mode(local_ray, tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    lines = []
    monkeypatch.setattr(GRPOLoop, "WAITING_NOTICE_S", 0.0)  # every wait for a batch says how far it got
    first = make_loop(loop_config(run_dir), lines)
    try:
        summary = first.run()
    finally:
        first.close()
    steps = read_steps(run_dir)
    assert [s["step"] for s in steps] == [1, 2, 3] and summary["steps"] == 3
    for key in ("eval_before", "eval_after"):  # held-out: one greedy + one sampled answer per prompt
        assert 0 <= summary[key]["eval_reward"] <= 1 and 0 <= summary[key]["eval_sampled_reward"] <= 1
    for s in steps:
        assert max(int(k) for k in s["staleness_hist"]) <= 1  # K = 1, per token
        if s["mismatch_fresh_max"] is not None:
            assert s["mismatch_fresh_max"] < 1e-5  # engine vs trainer, same weights, float32
        assert s["mtp_accepted_length"] is None or s["mtp_accepted_length"] >= 1.0
    assert any(s["mismatch_fresh_max"] is not None for s in steps)
    # one hang (sandbox killed after 0.5 s) and a raise on every sample: all scored 0, reported, loop went on
    assert steps[-1]["reward_failures"] > 4
    assert any("hang_once failed (timeout)" in line or "raises failed (error)" in line for line in lines)
    assert any(line.startswith("step 1: ") and "/2 groups ready" in line for line in lines)

    # crash after the step-2 checkpoint: step 3's work is lost, the run resumes at 2 -- now synchronous (K = 0),
    # so the buffered groups with tokens of version 1 are too old for step 2: dropped, their prompts served again
    checkpoints = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(checkpoints)) == ["step_00000002", "step_00000003"]
    shutil.rmtree(os.path.join(checkpoints, "step_00000003"))
    saved = state_digest(load_model_from_checkpoint(os.path.join(checkpoints, "step_00000002")).state_dict())

    # the resumed run also switches to 2 data-parallel trainer ranks and to the object-store weight path
    second = make_loop(
        loop_config(
            run_dir,
            stop_at_step=None,
            max_staleness=0,
            trainer={"micro_batch_size": 4, "num_ranks": 2},
            rollout={
                "group_size": 2,
                "sampling": {"max_new_tokens": 8},
                "engine": {"draft_tokens": 2, "max_batch": 8},
                "weight_sync": "object_store",
            },
        ),
        lines,
    )
    try:
        second.setup()
        assert second.version == 2
        # gathering sharded weights is collective: every trainer rank takes part, rank 0 has the digest
        digests = ray.get([t.weights_digest.remote() for t in second.trainers])
        assert digests[0] == pytest.approx(saved, rel=1e-12)
        summary = second.run()
        outstanding = (
            set(second.inflight)
            | {g.group_id for g in second.buffer.state_dict()["ready"]}
            | set(second.source.state_dict()["returned"])
        )
        next_uid = second.source.next_uid
    finally:
        second.close()
    assert summary["start_version"] == 2 and summary["steps"] == 4
    # the lost step 3's record is dropped on resume: each step logged once, the ones the weights went through
    logged = read_steps(run_dir)
    assert [s["step"] for s in logged] == [1, 2, 3, 4]
    assert [s["time"] for s in logged[:2]] == [s["time"] for s in steps[:2]]  # the first run's records of 1, 2
    resumed = logged[2:]
    for s in resumed:
        assert set(s["staleness_hist"]) == {"0"}  # synchronous: every token from the weights being trained
        assert s["mismatch_fresh_max"] < 1e-5
    trained = [g for s in steps[:2] + resumed for g in s["trained_groups"]]
    assert len(trained) == len(set(trained)) == 8  # nothing trained twice
    # nothing skipped: every uid handed out is trained, or still waiting (in flight, buffered, given back)
    assert set(trained) | outstanding == set(range(next_uid))
    assert not set(trained) & outstanding


@pytest.mark.slow
def test_loop_with_ppo_mini_batches(local_ray, tmp_path):
    """rl.updates_per_batch=2: each rollout batch is two optimizer steps, versions (and the logged step, the
    checkpoints) advance by 2, the staleness bound counts versions."""
    run_dir = str(tmp_path / "run")
    loop = make_loop(
        loop_config(run_dir, steps=4, stop_at_step=None, updates_per_batch=2, max_staleness=2, checkpoint_interval=3),
        [],
    )
    try:
        summary = loop.run()
    finally:
        loop.close()
    steps = read_steps(run_dir)
    assert [s["step"] for s in steps] == [2, 4] and summary["steps"] == 4
    assert all(s["optimizer_steps"] == 2 and s["skipped_steps"] == 0 for s in steps)
    assert all(max(int(k) for k in s["staleness_hist"]) <= 2 + 1 for s in steps)  # + the batch's own second step
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_00000004"]
