"""Hugging Face interop: our logits equal transformers' NemotronHForCausalLM on exported weights (float32, 1e-5
relative), and save -> load is bitwise, MTP included."""

import json

import pytest
import torch

from latentforge.model import HybridModel, ModelConfig
from latentforge.model.hf import from_hf_tensors, load_pretrained, read_tensors, save_pretrained, to_hf_tensors

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "latent_all_kinds_mtp": dict(pattern="M*E-ME", moe_latent_size=24, mtp_depths=2),
    "no_latent_nano_like": dict(pattern="MEM*E", moe_latent_size=None, num_experts=6, top_k=3),
    "mamba_moe_only": dict(pattern="MEEM", moe_latent_size=16, mamba_groups=1, mamba_num_heads=4),
    "attention_mlp_only": dict(pattern="*-*-", mtp_depths=1),
}


def tiny_config(**overrides) -> ModelConfig:
    base = dict(
        hidden_size=48,
        vocab_size=211,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        mamba_num_heads=6,
        mamba_head_dim=8,
        mamba_groups=2,
        ssm_state_size=8,
        chunk_size=8,
        num_experts=8,
        top_k=2,
        moe_intermediate_size=20,
        shared_expert_intermediate_size=40,
        mlp_intermediate_size=56,
        routed_scaling_factor=2.5,
    )
    base.update(overrides)
    return ModelConfig(**base)


def randomize(model: HybridModel):
    """Non-trivial values everywhere (norm weights, expert bias, D...) so no mismatch hides behind an init value."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(
                ("norm.weight", "enorm.weight", "hnorm.weight", "final_layernorm.weight", "norm_f.weight")
            ):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(("D", "dt_bias")):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def hf_model(path):
    from transformers import NemotronHForCausalLM

    model = NemotronHForCausalLM.from_pretrained(path, dtype=torch.float32, experts_implementation="eager")
    for module in model.modules():
        if hasattr(module, "time_step_limit"):
            module.time_step_limit = (0.0, float("inf"))  # its CPU path clamps dt at 1e-3 otherwise
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    torch.manual_seed(0)
    cfg = tiny_config(**CONFIGS[name])
    ours = HybridModel(cfg).eval()
    randomize(ours)
    save_pretrained(ours, tmp_path)
    theirs = hf_model(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 37))  # not a multiple of the chunk size
    with torch.no_grad():
        expected = theirs(ids, use_cache=False).logits
        got = ours(ids).logits
    assert got.shape == expected.shape
    rel = ((got - expected).abs().max() / expected.abs().max()).item()
    assert rel < 1e-5, f"{name}: relative difference {rel:.2e}"


def test_round_trip_is_bitwise_with_mtp(tmp_path):
    cfg = tiny_config(pattern="M*E-", mtp_depths=2)
    model = HybridModel(cfg)
    randomize(model)
    save_pretrained(model, tmp_path, max_shard_bytes=64 * 1024)  # force several shards + an index
    assert (tmp_path / "model.safetensors.index.json").exists()
    names = set(read_tensors(tmp_path))
    assert "mtp.layers.0.eh_proj.weight" in names and "mtp.layers.1.final_layernorm.weight" in names
    assert "backbone.layers.2.mixer.experts.7.down_proj.weight" in names
    assert "backbone.layers.2.mixer.gate.e_score_correction_bias" in names
    loaded = load_pretrained(tmp_path)
    assert loaded.cfg.to_dict() == cfg.to_dict()
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key


def test_loads_a_checkpoint_saved_by_transformers(tmp_path):
    cfg = tiny_config(pattern="ME*", mtp_depths=0)
    model = HybridModel(cfg)
    randomize(model)
    save_pretrained(model, tmp_path / "ours")
    hf_model(tmp_path / "ours").save_pretrained(tmp_path / "theirs")
    config = json.loads((tmp_path / "theirs" / "config.json").read_text())
    config.pop("latentforge", None)  # as if written by transformers alone
    (tmp_path / "theirs" / "config.json").write_text(json.dumps(config))
    loaded = load_pretrained(tmp_path / "theirs")
    ids = torch.randint(0, cfg.vocab_size, (1, 19))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_expert_names_convert_both_ways():
    stacked = {"backbone.layers.0.mixer.experts.up_proj": torch.randn(3, 4, 5)}
    split = to_hf_tensors(stacked)
    assert sorted(split) == [f"backbone.layers.0.mixer.experts.{e}.up_proj.weight" for e in range(3)]
    assert torch.equal(
        from_hf_tensors(split)["backbone.layers.0.mixer.experts.up_proj"],
        stacked["backbone.layers.0.mixer.experts.up_proj"],
    )
    transformers_style = {"model.layers.0.mixer.experts.up_proj": stacked["backbone.layers.0.mixer.experts.up_proj"]}
    assert "backbone.layers.0.mixer.experts.up_proj" in from_hf_tensors(transformers_style)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    model = HybridModel(tiny_config(pattern="M*"))
    save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["latentforge"]["pattern"] = "M*M"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing"):
        load_pretrained(tmp_path)
