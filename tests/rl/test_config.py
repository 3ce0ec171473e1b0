"""The grpo_tiny recipe composes into validated configs; bad settings fail with the field named."""

import pytest

from latentforge.rl.config import GRPOConfig, GRPOConfigError
from latentforge.rl.grpo import load_configs


def test_recipe_composes():
    rl, model, optim, tokenizer, task_seed, thinking, _, _ = load_configs(
        ["recipe=grpo_tiny", "rl.max_staleness=0", "rl.loss.kl_coef=0.05"])
    assert rl.max_staleness == 0 and rl.loss.kl_coef == 0.05 and rl.rollout.group_size == 8
    assert model["vocab_size"] >= 4096 and tokenizer["kind"] == "bpe"
    assert task_seed == 1234 and thinking is True  # the SFT data's seed and chat format
    assert optim.schedule == "constant"


def test_bad_settings_are_named():
    with pytest.raises(GRPOConfigError, match="rl.rollout.group_size"):
        GRPOConfig(rollout={"group_size": 1})
    with pytest.raises(GRPOConfigError, match=r"unknown rl.rollout config key\(s\) \['grup_size'\]"):
        GRPOConfig(rollout={"grup_size": 4})
    with pytest.raises(GRPOConfigError, match="max_staleness"):
        GRPOConfig(max_staleness=-1)
    with pytest.raises(ValueError, match="loss.kl_estimator"):
        GRPOConfig(loss={"kl_estimator": "k4"})
    with pytest.raises(GRPOConfigError, match="weight_sync"):
        GRPOConfig(rollout={"weight_sync": "nfs"})
