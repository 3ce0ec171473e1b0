"""Counting: the meta-device count reproduces SPEC's numbers to the element and SPEC's per-block formulas for
random configs; the CLI prints them."""

import random
import subprocess
import sys

import pytest

from latentforge.model import ModelConfig
from latentforge.model.params import count_parameters, meta_model, training_flops_per_token
from latentforge.model.recipes import compose, model_config_from


def spec_formulas(cfg: ModelConfig) -> dict:
    """SPEC section 2's per-block formulas, written independently of the modules."""
    H, nh, P, G, N, K = (
        cfg.hidden_size,
        cfg.mamba_num_heads,
        cfg.mamba_head_dim,
        cfg.mamba_groups,
        cfg.ssm_state_size,
        cfg.conv_kernel,
    )
    a, g, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    E, k, I, S = cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.shared_expert_intermediate_size
    mamba = H * (2 * nh * P + 2 * G * N + nh) + (nh * P + 2 * G * N) * (K + 1) + 3 * nh + nh * P + nh * P * H + H
    attention = H * a * d + 2 * H * g * d + a * d * H + H
    if cfg.moe_latent_size is None:
        moe = E * H + E + E * 2 * H * I + 2 * H * S + H
        moe_active = moe - (E - k) * 2 * H * I
    else:
        L = cfg.moe_latent_size
        moe = E * H + E + 2 * H * L + E * 2 * L * I + 2 * H * S + H
        moe_active = moe - (E - k) * 2 * L * I
    mlp = 2 * H * cfg.mlp_intermediate_size + H
    per_kind = {"mamba": mamba, "attention": attention, "moe": moe, "mlp": mlp}
    trunk = sum(per_kind[t] for t in cfg.layer_types) + 2 * cfg.vocab_size * H + H
    mtp = (2 * H + 2 * H * H + attention + moe + H) if cfg.mtp_depths else 0
    active = trunk - cfg.count("moe") * (moe - moe_active)
    return dict(total=trunk + mtp, without_mtp=trunk, mtp=mtp, active=active, per_kind=per_kind)


@pytest.mark.parametrize(
    "recipe, total, without, active",
    [
        ("super_120b", 123_611_033_088, 120_668_707_840, 12_770_237_440),
        ("nano_30b", 31_577_940_288, 31_577_940_288, 3_580_076_352),
    ],
)
def test_reference_models_exact(recipe, total, without, active):
    cfg = model_config_from(compose([f"recipe={recipe}"]))
    counts = count_parameters(meta_model(cfg))
    assert (counts.total, counts.without_mtp, counts.active) == (total, without, active)


def test_super_per_layer_and_flops():
    cfg = model_config_from(compose(["recipe=super_120b"]))
    counts = count_parameters(meta_model(cfg))
    assert counts.mtp == 2_942_325_248
    assert counts.per_layer["mamba"] == (40, 109_640_064, 109_640_064)
    assert counts.per_layer["attention"] == (8, 35_655_680, 35_655_680)
    assert counts.per_layer["moe"] == (40, 2_873_102_848, 175_641_088)
    assert training_flops_per_token(cfg, 4096) / 1e9 == pytest.approx(83.7, abs=0.05)


def test_meta_count_matches_formulas_for_random_configs():
    rng = random.Random(0)
    for _ in range(25):
        groups = rng.choice([1, 2, 4])
        kv = rng.choice([1, 2, 4])
        experts = rng.randint(2, 12)
        hidden = rng.choice([32, 48, 64])
        cfg = ModelConfig(
            pattern="".join(rng.choice("M*E-") for _ in range(rng.randint(1, 9))),
            hidden_size=hidden,
            vocab_size=rng.randint(50, 500),
            num_attention_heads=kv * rng.randint(1, 4),
            num_key_value_heads=kv,
            head_dim=rng.choice([8, 16]),
            mamba_num_heads=groups * rng.randint(1, 3),
            mamba_head_dim=rng.choice([4, 8]),
            mamba_groups=groups,
            ssm_state_size=rng.choice([4, 8, 16]),
            conv_kernel=rng.choice([2, 3, 4]),
            num_experts=experts,
            top_k=rng.randint(1, experts),
            moe_intermediate_size=rng.randint(4, 40),
            moe_latent_size=rng.choice([None, 16, hidden]),
            shared_expert_intermediate_size=rng.randint(4, 64),
            mlp_intermediate_size=rng.randint(8, 64),
            mtp_depths=rng.choice([0, 1, 2]),
        )
        counts = count_parameters(meta_model(cfg))
        expected = spec_formulas(cfg)
        assert counts.total == expected["total"], cfg
        assert counts.without_mtp == expected["without_mtp"], cfg
        assert counts.mtp == expected["mtp"], cfg
        assert counts.active == expected["active"], cfg
        for kind, (_, each, _) in counts.per_layer.items():
            assert each == expected["per_kind"][kind], (kind, cfg)


def test_meta_build_allocates_nothing():
    cfg = model_config_from(compose(["recipe=super_120b"]))
    model = meta_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())


def test_cli_prints_the_counts():
    out = subprocess.run(
        [sys.executable, "-m", "latentforge.model.params", "recipe=super_120b", "seq_len=4096"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for number in ("123,611,033,088", "120,668,707,840", "12,770,237,440", "83.72 GFLOP"):
        assert number in out
