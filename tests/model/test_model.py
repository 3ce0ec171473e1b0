"""Behaviour of the hybrid model against independent formulations: document resets, the MoE router, the
expert-bias rule, initialisation (the losses: tests/train/test_loss.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from latentforge.model import HybridModel, ModelConfig


def small(**overrides) -> ModelConfig:
    base = dict(
        pattern="M*E-M",
        hidden_size=32,
        vocab_size=97,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        mamba_num_heads=4,
        mamba_head_dim=8,
        mamba_groups=2,
        ssm_state_size=8,
        chunk_size=8,
        num_experts=6,
        top_k=2,
        moe_intermediate_size=16,
        moe_latent_size=16,
        shared_expert_intermediate_size=24,
        mlp_intermediate_size=40,
        mtp_depths=2,
    )
    base.update(overrides)
    return ModelConfig(**base)


def test_packed_documents_equal_separate_documents():
    torch.manual_seed(0)
    model = HybridModel(small()).eval()
    a, b = torch.randint(0, 97, (1, 13)), torch.randint(0, 97, (1, 22))
    packed = torch.cat([a, b], dim=1)
    seq_idx = torch.cat([torch.zeros(1, 13), torch.ones(1, 22)], dim=1).int()
    with torch.no_grad():
        together = model(packed, seq_idx=seq_idx).logits
        alone = torch.cat([model(a).logits, model(b).logits], dim=1)
        leaky = model(packed).logits
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaky[:, 13:], alone[:, 13:], atol=1e-3)  # without seq_idx state does leak


def test_router_bias_chooses_but_does_not_weigh():
    torch.manual_seed(0)
    cfg = small()
    model = HybridModel(cfg)
    router = model.backbone.layers[2].mixer.gate
    x = torch.randn(10, 32)
    (scores, idx, _), weight = router(x)
    assert torch.allclose(weight.sum(-1), torch.full((10,), cfg.routed_scaling_factor))
    with torch.no_grad():
        router.e_score_correction_bias[5] = 10.0
    (scores_b, idx_b, own_b), weight_b = router(x)
    assert torch.equal(scores, scores_b) and (idx_b == 5).any(-1).all() and torch.equal(own_b, idx_b)
    expected = scores.gather(-1, idx_b) / scores.gather(-1, idx_b).sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(weight_b, expected)


def test_expert_bias_update_rule():
    model = HybridModel(small())
    layers = model.moe_layers()
    load = torch.tensor([[10, 0, 5, 5, 3, 7]] * len(layers))
    model.update_expert_bias(load)
    bias = layers[0].gate.e_score_correction_bias
    torch.testing.assert_close(bias, 1e-3 * torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0, -1.0]))
    with pytest.raises(ValueError, match="MoE layers"):
        model.update_expert_bias(load[:1])


def test_initialisation_follows_the_spec():
    torch.manual_seed(0)
    cfg = small(mamba_num_heads=64, mamba_groups=2, init_std=0.014)
    model = HybridModel(cfg)
    mixer = model.backbone.layers[0].mixer
    a = torch.exp(mixer.A_log)
    assert a.min() >= 1 and a.max() <= 16
    dt = F.softplus(mixer.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert mixer.in_proj.weight.std().item() == pytest.approx(0.014, rel=0.05)
    out_std = 0.014 / math.sqrt(2 * cfg.num_layers)
    assert mixer.out_proj.weight.std().item() == pytest.approx(out_std, rel=0.1)
    assert torch.equal(model.backbone.norm_f.weight, torch.ones(32))
    assert model.backbone.layers[2].mixer.gate.e_score_correction_bias.abs().sum() == 0
