"""Adapters saved in PEFT layout load with PEFT onto transformers' NemotronHForCausalLM (the independent reference):
its logits equal ours with the adapter, and equal our merged model and its Hugging Face export. The default targets
load with stock PEFT; an adapter on the Mamba out_proj (opt-in) is refused by stock PEFT, and with that check
switched off it matches too. The reverse as well: an adapter PEFT itself wrote loads onto our model."""

from unittest import mock

import pytest
import torch

from latentforge.model import HybridModel
from latentforge.model.hf import save_pretrained
from tests.model.test_hf import hf_model, randomize, tiny_config
from latentforge.train.lora import (
    DEFAULT_TARGETS,
    LoRAConfig,
    PEFTCompatibilityWarning,
    apply_lora,
    load_adapter,
    lora_parameters,
    merge_lora,
    save_adapter,
)

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")


def relative_error(got, expected) -> float:
    return ((got - expected).abs().max() / expected.abs().max()).item()


def randomize_adapters(model, seed=3):
    """B starts at zero (the adapter is a no-op); give every factor values so a misplaced one shows up."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def build(pattern="M*E-", **overrides):
    torch.manual_seed(0)
    cfg = tiny_config(pattern=pattern, moe_latent_size=24, **overrides)
    model = HybridModel(cfg).eval()
    randomize(model)
    return model


def peft_model(base_dir, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model(base_dir), str(adapter_dir)).eval()


def no_mamba_check():
    # PEFT refuses LoRA on any module named out_proj (or conv1d) of a nemotron_h model because transformers' fused
    # CUDA training kernel reads out_proj.weight directly (bypassing the adapter); its CPU path and inference call
    # the module, so the adapter itself is well-defined and the refusal is policy, not layout.
    return mock.patch("peft.tuners.tuners_utils._check_lora_target_modules_mamba", lambda *a, **k: None)


@pytest.mark.parametrize("case", ["default_targets", "routed_experts_rslora", "mamba_out_proj"])
def test_adapter_loads_in_peft_and_logits_match(tmp_path, case):
    model = build(mtp_depths=2)  # MTP present in ours, absent in transformers: adapters stay off it
    if case == "default_targets":
        cfg = LoRAConfig(rank=4, alpha=8, dropout=0.1)
    elif case == "routed_experts_rslora":
        cfg = LoRAConfig(rank=3, alpha=5, use_rslora=True, routed_experts=True)
    else:
        cfg = LoRAConfig(rank=4, alpha=8, targets=DEFAULT_TARGETS + ["out_proj"])
    save_pretrained(model, tmp_path / "base")
    if case == "mamba_out_proj":
        with pytest.warns(PEFTCompatibilityWarning, match="out_proj"):
            adapted = apply_lora(model, cfg)
        assert "backbone.layers.0.mixer.out_proj" in adapted
    else:
        adapted = apply_lora(model, cfg)
    assert not any(n.startswith("mtp.") for n in adapted)
    randomize_adapters(model)
    model.eval()
    save_adapter(model, tmp_path / "adapter", cfg, base_model_name_or_path=str(tmp_path / "base"))

    ids = torch.randint(0, model.cfg.vocab_size, (2, 21))
    with torch.no_grad():
        ours = model(ids).logits
        if case == "mamba_out_proj":
            with pytest.raises(ValueError, match="out_proj"):  # what stock PEFT 0.21 says about Mamba out_proj
                peft_model(tmp_path / "base", tmp_path / "adapter")
            with no_mamba_check():
                theirs_model = peft_model(tmp_path / "base", tmp_path / "adapter")
        else:  # stock PEFT, nothing patched
            theirs_model = peft_model(tmp_path / "base", tmp_path / "adapter")
        theirs = theirs_model(ids, use_cache=False).logits
        plain = hf_model(tmp_path / "base")(ids, use_cache=False).logits
    assert relative_error(plain, theirs) > 1e-2, "the adapter changed nothing: the test would prove nothing"
    assert relative_error(ours, theirs) < 1e-5

    merge_lora(model)
    assert not lora_parameters(model)
    with torch.no_grad():
        merged = model(ids).logits
    # (W + s B A) x against W x + s B (A x): the same sum in another fp32 order
    assert relative_error(merged, theirs) < 1e-4
    save_pretrained(model, tmp_path / "merged")
    with torch.no_grad():
        exported = hf_model(tmp_path / "merged")(ids, use_cache=False).logits
    assert relative_error(exported, merged) < 1e-5


def test_adapter_written_by_peft_loads_onto_our_model(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = build(mtp_depths=0)
    save_pretrained(model, tmp_path / "base")
    theirs_model = get_peft_model(
        hf_model(tmp_path / "base"),
        LoraConfig(
            r=4,
            lora_alpha=6,
            target_modules=["q_proj", "v_proj", "in_proj", "up_proj"],
            target_parameters=["experts.up_proj", "experts.down_proj"],
            init_lora_weights=False,
        ),
    )
    theirs_model.save_pretrained(tmp_path / "adapter")  # keys `base_model.model.model.layers...`
    cfg = load_adapter(model, tmp_path / "adapter")
    assert cfg.routed_experts and cfg.rank == 4
    ids = torch.randint(0, model.cfg.vocab_size, (1, 17))
    with torch.no_grad():
        theirs = theirs_model.eval()(ids, use_cache=False).logits
        assert relative_error(model.eval()(ids).logits, theirs) < 1e-5


def test_save_load_round_trip_is_exact(tmp_path):
    model = build(mtp_depths=0)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoRAConfig(rank=2, alpha=4, routed_experts=True)
    apply_lora(model, cfg)
    randomize_adapters(model)
    save_adapter(model, tmp_path / "adapter", cfg)

    fresh = build(mtp_depths=0)
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "adapter")
    saved, loaded = lora_parameters(model), lora_parameters(fresh)
    assert saved.keys() == loaded.keys()
    for name in saved:
        assert torch.equal(saved[name], loaded[name]), name
