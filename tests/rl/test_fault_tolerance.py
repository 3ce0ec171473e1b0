"""GRPO on Ray survives dead processes: a rollout worker, a reward worker or a trainer rank is killed with a real
SIGKILL (os.kill of the actor's pid) mid-run; the run finishes and every prompt uid is trained exactly once (or
still waits, in flight / buffered / given back, at the end: none lost, none twice)."""

import json
import os
import signal

import pytest

ray = pytest.importorskip("ray")

from latentforge.data.config import TokenizerConfig  # noqa: E402
from latentforge.rl.config import GRPOConfig  # noqa: E402
from latentforge.rl.loop import GRPOLoop  # noqa: E402
from latentforge.train.config import OptimConfig  # noqa: E402
from tests.rl.helpers import micro_model_cfg  # noqa: E402


def rollout_cfg(num_workers: int) -> dict:
    return {
        "group_size": 2,
        "num_workers": num_workers,
        "sampling": {"max_new_tokens": 8},
        "engine": {"draft_tokens": 0, "max_batch": 8},
    }


def make_loop(run_dir, lines, **overrides):
    values = dict(
        steps=3,
        groups_per_step=2,
        max_staleness=1,
        checkpoint_interval=10,
        seed=0,
        filter_zero_advantage=False,
        filter_overlong=False,
        run_dir=run_dir,
        wandb={"enabled": False},
        eval_samples=0,
        rollout=rollout_cfg(num_workers=2),
        trainer={"micro_batch_size": 4},
        reward={"task_weight": 1.0},
        prompts={"tasks": [{"name": "arithmetic", "num": 300}], "eval_tasks": []},
    )
    values.update(overrides)
    cfg = GRPOConfig(**values)
    return GRPOLoop(
        cfg,
        micro_model_cfg(4096),
        OptimConfig(lr=1e-3, schedule="constant"),
        tokenizer_spec=vars(TokenizerConfig()),
        run_dir=run_dir,
        task_seed=1234,
        print_fn=lines.append,
    )


def pid_of(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda actor: os.getpid()))


def kill(handle) -> int:
    pid = pid_of(handle)
    os.kill(pid, signal.SIGKILL)
    return pid


def final_history(run_dir):
    """The logged steps, by step and in file order (a step trained again after a trainer restart replaced the
    abandoned one's record: each step is logged once)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "trained_groups" in r]
    return {s["step"]: s for s in steps}, steps


def assert_each_uid_once(loop, trained):
    outstanding = (
        set(loop.inflight)
        | {g.group_id for g in loop.buffer.state_dict()["ready"]}
        | set(loop.source.state_dict()["returned"])
    )
    assert len(trained) == len(set(trained)), f"a prompt trained twice: {sorted(trained)}"
    assert set(trained) | outstanding == set(range(loop.source.next_uid))  # none lost
    assert not set(trained) & outstanding


@pytest.mark.slow
def test_dead_rollout_and_reward_workers_are_replaced(local_ray, tmp_path):
    """Rollout worker 0 dies while generating, rollout worker 1 as the weights are pushed to it (the broadcast
    group loses a member), the reward worker between two batches."""
    run_dir = str(tmp_path / "run")
    lines, killed = [], {}
    loop = make_loop(run_dir, lines)
    on_samples, push_once = loop._on_samples, loop._push_once

    def kill_while_generating(samples):  # runs in the driver between two events
        if samples and "rollout 0" not in killed:
            killed["rollout 0"] = kill(loop.rollouts[0])
        elif loop.version >= 2 and "reward" not in killed:
            killed["reward"] = kill(loop.rewarders[0])
        on_samples(samples)

    def kill_while_pushing():
        if loop.version == 1 and "rollout 1" not in killed:
            killed["rollout 1"] = kill(loop.rollouts[1])
        return push_once()

    loop._on_samples, loop._push_once = kill_while_generating, kill_while_pushing
    try:
        summary = loop.run()
        new_pids = [pid_of(h) for h in loop.rollouts + loop.rewarders]
        by_step, _ = final_history(run_dir)
        assert_each_uid_once(loop, [g for s in by_step.values() for g in s["trained_groups"]])
    finally:
        loop.close()
    assert summary["steps"] == 3 and sorted(by_step) == [1, 2, 3]
    assert len(killed) == 3 and not set(new_pids) & set(killed.values())
    assert summary["counters"]["worker_restarts"] == 3 == by_step[3]["worker_restarts"]
    assert any(line.startswith("rollout worker 0 died") for line in lines), lines


@pytest.mark.slow
def test_dead_trainer_rank_rebuilds_the_group_from_the_checkpoint(local_ray, tmp_path):
    run_dir = str(tmp_path / "run")
    lines, killed = [], []
    loop = make_loop(
        run_dir,
        lines,
        steps=4,
        checkpoint_interval=2,
        rollout=rollout_cfg(num_workers=1),
        trainer={"micro_batch_size": 4, "num_ranks": 2},
    )
    on_trainers = loop._on_trainers
    logged_before_the_kill = []

    def kill_during_step_4(futures):  # right after the ranks were given step 4's batch: step 3 is logged
        if loop._training and loop.version == 3 and not killed:
            logged_before_the_kill.extend(final_history(run_dir)[1])
            killed.append(kill(loop.trainers[1]))
        return on_trainers(futures)

    loop._on_trainers = kill_during_step_4
    try:
        summary = loop.run()
        by_step, logged = final_history(run_dir)
        assert_each_uid_once(loop, [g for s in by_step.values() for g in s["trained_groups"]])
    finally:
        loop.close()
    assert killed and summary["steps"] == 4 and sorted(by_step) == [1, 2, 3, 4]
    assert summary["counters"]["trainer_restarts"] == 1
    assert any("trainer group rebuilt from" in line and "step_00000002" in line for line in lines), lines
    # steps 1-2 (in the checkpoint) are not trained again; the abandoned step 3's record gave way to the one
    # trained again after the restart: every step logged once
    assert [s["step"] for s in logged_before_the_kill] == [1, 2, 3]
    assert [s["step"] for s in logged] == [1, 2, 3, 4]
    assert [s["time"] for s in logged[:2]] == [s["time"] for s in logged_before_the_kill[:2]]
    assert logged[2]["trainer_restarts"] == 1 and logged_before_the_kill[2]["trainer_restarts"] == 0


def test_restart_budget_spent_stops_with_the_checkpoint_named(local_ray, tmp_path):
    run_dir = str(tmp_path / "run")
    lines, killed = [], []
    loop = make_loop(run_dir, lines, max_worker_restarts=0, rollout=rollout_cfg(num_workers=1))
    on_samples = loop._on_samples

    def kill_once(samples):
        if samples and not loop._evaluating and not killed:
            killed.append(kill(loop.rewarders[0]))
        on_samples(samples)

    loop._on_samples = kill_once
    try:
        with pytest.raises(RuntimeError, match=r"reward worker 0 died .*rl.max_worker_restarts=0.*Newest checkpoint"):
            loop.run()
    finally:
        loop.close()


@pytest.mark.slow
def test_dead_trainer_before_any_checkpoint_starts_over_from_the_initial_weights(local_ray, tmp_path):
    run_dir = str(tmp_path / "run")
    lines, killed = [], []
    loop = make_loop(run_dir, lines, steps=2, rollout=rollout_cfg(num_workers=1))
    on_trainers = loop._on_trainers

    def kill_during_step_1(futures):
        if loop._training and not killed:
            killed.append(kill(loop.trainers[0]))
        return on_trainers(futures)

    loop._on_trainers = kill_during_step_1
    try:
        summary = loop.run()
        by_step, _ = final_history(run_dir)
        assert_each_uid_once(loop, [g for s in by_step.values() for g in s["trained_groups"]])
    finally:
        loop.close()
    assert killed and summary["steps"] == 2 and sorted(by_step) == [1, 2]
    assert any("trainer group rebuilt from the initial weights, continuing at step 0" in line for line in lines), lines
