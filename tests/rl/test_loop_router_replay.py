"""A real Ray GRPO run with rl.router_replay=true: the rollout workers record every token's experts, the routes
travel with the samples through the reward worker and the buffer to the trainer ranks, which replay them."""

import json
import os

import pytest

ray = pytest.importorskip("ray")

from latentforge.data.config import TokenizerConfig  # noqa: E402
from latentforge.rl.config import GRPOConfig  # noqa: E402
from latentforge.rl.loop import GRPOLoop  # noqa: E402
from latentforge.train.config import OptimConfig  # noqa: E402
from tests.rl.helpers import micro_model_cfg  # noqa: E402


def test_grpo_on_ray_with_router_replay(local_ray, tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = GRPOConfig(
        steps=2,
        groups_per_step=2,
        max_staleness=0,
        router_replay=True,
        seed=0,
        filter_zero_advantage=False,
        filter_overlong=False,
        run_dir=run_dir,
        wandb={"enabled": False},
        eval_samples=0,
        rollout={"group_size": 2, "sampling": {"max_new_tokens": 8}, "engine": {"draft_tokens": 2, "max_batch": 8}},
        trainer={"micro_batch_size": 4},
        prompts={"tasks": [{"name": "arithmetic", "num": 100}], "eval_tasks": []},
    )
    loop = GRPOLoop(
        cfg,
        micro_model_cfg(4096),
        OptimConfig(lr=1e-3, schedule="constant"),
        tokenizer_spec=vars(TokenizerConfig()),
        run_dir=run_dir,
        task_seed=1234,
        print_fn=lambda _: None,
    )
    try:
        summary = loop.run()
    finally:
        loop.close()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "trained_groups" in r]
    assert summary["steps"] == 2 and [s["step"] for s in steps] == [1, 2]
    for s in steps:
        # the routes reached the trainer (router agreement is measured only against recorded routes); synchronous,
        # fp32: the trainer's router picks what the engine's did, and the log-probs match
        assert s["router_agreement"] == pytest.approx(1.0)
        assert s["mismatch_fresh_max"] < 1e-5
