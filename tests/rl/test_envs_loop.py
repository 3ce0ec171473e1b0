"""Environment episodes through the whole GRPO loop on a local Ray: requests carry their records, rollout workers
play the episodes, the reward worker leaves environment rewards alone, per-step and eval episode metrics."""

import json
import os

import pytest

ray = pytest.importorskip("ray")

from latentforge.data.config import TokenizerConfig  # noqa: E402
from latentforge.rl.config import GRPOConfig  # noqa: E402
from latentforge.rl.loop import GRPOLoop  # noqa: E402
from tests.rl.helpers import micro_model_cfg  # noqa: E402
from latentforge.train.config import OptimConfig  # noqa: E402


@pytest.mark.slow  # about 70 s on 2 cores (Ray start-up, two steps, two evaluations)
def test_guess_number_episodes_train_and_evaluate(local_ray, tmp_path):
    run_dir = str(tmp_path / "run")
    cfg = GRPOConfig(
        steps=2,
        groups_per_step=2,
        max_staleness=1,
        seed=0,
        filter_zero_advantage=False,
        filter_overlong=False,
        run_dir=run_dir,
        wandb={"enabled": False},
        eval_samples=1,
        rollout={"group_size": 2, "sampling": {"max_new_tokens": 8}, "engine": {"max_batch": 8}, "max_turns": 3},
        trainer={"micro_batch_size": 4},
        prompts={"tasks": [{"name": "guess_number", "num": 50}], "eval_tasks": [{"name": "guess_number", "num": 2}]},
    )
    lines = []
    loop = GRPOLoop(
        cfg,
        micro_model_cfg(4096),
        OptimConfig(lr=1e-3, schedule="constant"),
        tokenizer_spec=vars(TokenizerConfig()),
        run_dir=run_dir,
        task_seed=1,
        print_fn=lines.append,
    )
    try:
        summary = loop.run()
    finally:
        loop.close()
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        steps = [r for r in map(json.loads, f) if "trained_groups" in r]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert 1 <= s["turns"] <= 3 and 0 <= s["tool_error_rate"] <= 1 and s["env_failure_rate"] == 0
    for key in ("eval_before", "eval_after"):
        ev = summary[key]
        assert 1 <= ev["eval_turns"] <= 3 and 0 <= ev["eval_reward"] <= 1 and ev["eval_sampled_reward_se"] >= 0
    assert any("turns" in line for line in lines)
