"""The grpo_tiny recipe composes into validated configs; bad settings fail with the field named."""

import pytest

from latentforge.rl.config import GRPOConfig, GRPOConfigError
from latentforge.rl.grpo import load_configs


def test_recipe_composes_into_typed_configs():
    from latentforge.data.config import DataConfig, TokenizerConfig
    from latentforge.model.config import ModelConfig
    from latentforge.train.config import OptimConfig
    from latentforge.train.parallel.config import ParallelConfig
    from latentforge.train.precision.config import PrecisionConfig

    setup = load_configs(["recipe=grpo_tiny", "rl.max_staleness=0", "rl.loss.kl_coef=0.05", "parallel.tp=2"])
    rl = setup.rl
    assert rl.max_staleness == 0 and rl.loss.kl_coef == 0.05 and rl.rollout.group_size == 8
    assert rl.run_name == "grpo_tiny" and rl.steps == 120  # the recipe's, over GRPOConfig's defaults
    for value, kind in (
        (setup.model, ModelConfig),
        (setup.optim, OptimConfig),
        (setup.data, DataConfig),
        (setup.parallel, ParallelConfig),
        (setup.precision, PrecisionConfig),
        (setup.tokenizer, TokenizerConfig),
    ):
        assert type(value) is kind
    assert setup.model.vocab_size >= 4096 and setup.tokenizer.kind == "bpe" and setup.parallel.tp == 2
    assert setup.task_seed == 1234 and setup.data.enable_thinking is True  # the SFT data's seed and chat format
    assert setup.optim.schedule == "constant"


def test_the_policy_architecture_comes_from_rl_init_from(tmp_path):
    import json

    from latentforge.model.config import ModelConfig
    from latentforge.model.hf import MODEL_CONFIG_FILE
    from latentforge.rl.trainer import resolve_model_config

    recipe = ModelConfig()
    assert resolve_model_config(None, recipe) is recipe
    step = tmp_path / "step_00000002"  # a DCP checkpoint directory, as train/ writes them
    step.mkdir()
    (step / MODEL_CONFIG_FILE).write_text(json.dumps(ModelConfig(hidden_size=96).to_dict()))
    (step / ".metadata").write_text("")
    assert resolve_model_config(str(step), recipe) == ModelConfig(hidden_size=96)
    with pytest.raises(FileNotFoundError, match="rl.init_from="):
        resolve_model_config(str(tmp_path / "nowhere"), recipe)


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


def test_rollout_holds_the_engine_and_sampling_configs_with_their_own_defaults():
    from dataclasses import fields

    from latentforge.model.engine import EngineConfig, SamplingParams
    from latentforge.rl.config import RolloutConfig

    plain = GRPOConfig()
    assert plain.rollout.engine == EngineConfig() and plain.rollout.sampling == SamplingParams()
    restated = {f.name for f in fields(RolloutConfig)} & (
        {f.name for f in fields(EngineConfig)} | {f.name for f in fields(SamplingParams)}
    )
    assert not restated, f"RolloutConfig restates engine / sampling fields: {restated}"
    rl = load_configs(["recipe=grpo_tiny", "rl.rollout.engine.draft_gate=true", "rl.rollout.sampling.top_p=0.9"]).rl
    assert isinstance(rl.rollout.engine, EngineConfig) and isinstance(rl.rollout.sampling, SamplingParams)
    assert (rl.rollout.engine.max_batch, rl.rollout.engine.draft_tokens, rl.rollout.engine.draft_gate) == (32, 2, True)
    assert (rl.rollout.sampling.max_new_tokens, rl.rollout.sampling.top_p) == (96, 0.9)


def test_flat_rollout_keys_name_their_new_place():
    with pytest.raises(GRPOConfigError, match=r"rl\.rollout\.max_batch is now rl\.rollout\.engine\.max_batch"):
        GRPOConfig.from_dict({"rollout": {"max_batch": 4}})
    from latentforge.model.errors import UserError

    for override in ("rl.rollout.temperature=0.7", "+rl.rollout.temperature=0.7"):  # Hydra would say: add it with +
        with pytest.raises(UserError, match=r"rl\.rollout\.temperature is now rl\.rollout\.sampling\.temperature"):
            load_configs(["recipe=grpo_tiny", override])
    load_configs(["recipe=grpo_tiny", "rl.rollout.sampling.temperature=0.7", "train.steps=3"])  # others pass
    with pytest.raises(GRPOConfigError, match=r"rl\.rollout\.sampling\.temperature must be > 0"):
        GRPOConfig(rollout={"sampling": {"temperature": 0.0}})
    with pytest.raises(GRPOConfigError, match=r"rl\.rollout\.engine\.max_batch must be an integer, got 'many'"):
        GRPOConfig(rollout={"engine": {"max_batch": "many"}})


def test_a_rollout_worker_builds_its_engine_and_requests_from_the_nested_configs():
    from latentforge.model.engine import EngineConfig, SamplingParams
    from latentforge.rl.actors.rollout import RolloutWorker
    from latentforge.rl.config import RolloutConfig
    from tests.rl.helpers import micro_model_cfg

    rollout = RolloutConfig(
        engine=EngineConfig(max_batch=3, draft_tokens=1, max_seq_len=9999, seed=77),
        sampling=SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, stop_token_ids=[9]),
    )
    worker = RolloutWorker(0, micro_model_cfg(), rollout, max_seq_len=40, stop_token_ids=[2], seed=5)
    try:
        engine = worker.engine.config
        assert (engine.max_batch, engine.draft_tokens, engine.max_seq_len, engine.seed) == (3, 1, 40, 5)
        train = worker.sampling_params({"kind": "train", "seed": 11})
        assert (train.temperature, train.top_p, train.max_new_tokens, train.stop_token_ids, train.seed) == (
            0.7,
            0.9,
            5,
            (9, 2),
            11,
        )
        held_out = worker.sampling_params({"kind": "eval", "max_new_tokens": 8})
        assert (held_out.temperature, held_out.top_p, held_out.max_new_tokens) == (0.0, 1.0, 8)
    finally:
        worker.stop()


def test_engine_sampling_and_data_checks_are_user_errors_naming_the_group():
    from latentforge.data.config import DataConfig
    from latentforge.model.errors import UserError

    with pytest.raises(GRPOConfigError, match=r"rl\.rollout\.engine: EngineConfig\.max_batch must be >= 1, got 0"):
        GRPOConfig(rollout={"engine": {"max_batch": 0}})
    with pytest.raises(GRPOConfigError, match=r"rl\.rollout\.sampling: SamplingParams\.top_p must be in \(0, 1\]"):
        GRPOConfig.from_dict({"rollout": {"sampling": {"top_p": 2.0}}})
    with pytest.raises(UserError, match="data.kind must be 'pretrain' or 'sft'"):
        DataConfig.from_any({"kind": "rl"})
