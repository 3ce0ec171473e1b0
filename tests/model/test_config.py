"""ModelConfig validation names the bad field and the fix."""

import pytest

from latentforge.model import ConfigError, ModelConfig
from latentforge.model.recipes import compose, model_config_from


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(pattern="MX*"), "unknown symbol 'X' at position 1"),
        (dict(pattern="M*/*E"), "model.mtp_depths"),
        (dict(pattern=""), "no layers"),
        (dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
        (dict(mamba_num_heads=6, mamba_groups=4), "mamba_groups"),
        (dict(moe_latent_size=128, hidden_size=64), "moe_latent_size"),
        (dict(top_k=9, num_experts=8), "top_k"),
        (dict(hidden_size=0), "hidden_size must be positive"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("*", r"\*")):
        ModelConfig(**{"pattern": "M*E-", **overrides})


def test_pipeline_cuts_are_parsed():
    cfg = ModelConfig(pattern="ME|M*|E-")
    assert cfg.layer_pattern == "MEM*E-"
    assert cfg.pipeline_cuts == [2, 4]


def test_unknown_recipe_key_is_named():
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.from_dict({"hiden_size": 4})
    cfg = compose(["recipe=tiny", "+model.hiden_size=3"])
    with pytest.raises(ConfigError, match="unknown model config key"):
        model_config_from(cfg)


def test_recipes_carry_spec_values():
    sup = model_config_from(compose(["recipe=super_120b"]))
    assert (sup.hidden_size, sup.num_layers, sup.count("mamba"), sup.count("moe"), sup.count("attention")) == (
        4096,
        88,
        40,
        40,
        8,
    )
    assert (sup.num_experts, sup.top_k, sup.moe_latent_size, sup.routed_scaling_factor, sup.mtp_depths) == (
        512,
        22,
        1024,
        5.0,
        2,
    )
    nano = model_config_from(compose(["recipe=nano_30b"]))
    assert (nano.hidden_size, nano.num_layers, nano.moe_latent_size, nano.num_experts, nano.top_k) == (
        2688,
        52,
        None,
        128,
        6,
    )
    tiny = model_config_from(compose(["recipe=tiny"]))
    assert (
        set(tiny.layer_types) == {"mamba", "attention", "moe", "mlp"} and tiny.mtp_depths > 0 and tiny.moe_latent_size
    )
