"""Adapters find their base: an adapter trained on a DCP checkpoint records a Hugging Face export of that base
(written next to the adapter, with its tokenizer files), and stock PEFT's AutoPeftModelForCausalLM loads the adapter
directory alone (offline, local paths) with logits equal to ours with the adapters on."""

import json
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from latentforge.data.tokenizer import train_bpe
from latentforge.model import HybridModel
from latentforge.model.hf import MODEL_CONFIG_FILE, TOKENIZER_FILE, read_tensors
from latentforge.train.lora import LoRAConfig, apply_lora, lora_state_dict, write_adapter
from latentforge.train.lora.checkpoint import LORA_CONFIG_FILE
from latentforge.train.lora.peft_format import BASE_EXPORT_DIR
from tests.model.test_hf import randomize, tiny_config
from tests.train.test_lora_peft import randomize_adapters, relative_error

pytest.importorskip("peft")
pytest.importorskip("transformers")

VOCAB = 300


def write_dcp(model, folder, tokenizer_file, lora_cfg=None):
    """A checkpoint as the trainers write it: DCP shards of `model`, model_config.json, tokenizer.json."""
    os.makedirs(folder)
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder), no_dist=True)
    (folder / MODEL_CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict()))
    (folder / TOKENIZER_FILE).write_bytes(open(tokenizer_file, "rb").read())
    if lora_cfg is not None:
        (folder / LORA_CONFIG_FILE).write_text(json.dumps(lora_cfg.to_dict()))
    return folder


@pytest.fixture
def base(tmp_path):
    tokenizer = train_bpe(["def f(x):\n    return x + 1\n" * 40], VOCAB, str(tmp_path / "bpe" / "tokenizer.json"))
    torch.manual_seed(0)
    model = HybridModel(tiny_config(pattern="M*E-", vocab_size=VOCAB, moe_latent_size=24, mtp_depths=0)).eval()
    randomize(model)
    return model, write_dcp(model, tmp_path / "run" / "checkpoints" / "step_00000010", tokenizer.path)


def auto_peft(adapter_dir):
    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(
        str(adapter_dir), dtype=torch.float32, experts_implementation="eager"
    )
    for module in model.modules():
        if hasattr(module, "time_step_limit"):
            module.time_step_limit = (0.0, float("inf"))  # transformers' CPU path clamps dt at 1e-3 otherwise
    return model.eval()


def test_auto_peft_loads_an_adapter_trained_on_a_dcp_checkpoint(base, tmp_path):
    model, checkpoint = base
    cfg = LoRAConfig(rank=4, alpha=8)
    apply_lora(model, cfg, warn_peft=False)
    randomize_adapters(model)
    adapter = write_adapter(lora_state_dict(model), tmp_path / "run" / "adapter", cfg, str(tmp_path / "run"))
    recorded = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "run" / BASE_EXPORT_DIR).resolve())
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    } <= set(os.listdir(recorded))

    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids).logits
        got = auto_peft(adapter)(input_ids=ids).logits
    assert relative_error(got, expected) < 1e-5

    before = os.path.getmtime(os.path.join(recorded, "model.safetensors"))
    write_adapter(lora_state_dict(model), tmp_path / "run" / "adapter", cfg, str(checkpoint))
    assert os.path.getmtime(os.path.join(recorded, "model.safetensors")) == before  # the same base: reused
    best = write_adapter(lora_state_dict(model), tmp_path / "run" / "best" / "adapter", cfg, str(checkpoint))
    assert json.loads((best / "adapter_config.json").read_text())["base_model_name_or_path"] == recorded
    assert not (tmp_path / "run" / "best" / BASE_EXPORT_DIR).exists()  # one level up: found, not exported again
    # SFT writes best/adapter (and its base export) before the final adapter: a sibling's export is found too
    first = write_adapter(lora_state_dict(model), tmp_path / "sft" / "best" / "adapter", cfg, str(checkpoint))
    final = write_adapter(lora_state_dict(model), tmp_path / "sft" / "adapter", cfg, str(checkpoint))
    base_of = [json.loads((d / "adapter_config.json").read_text())["base_model_name_or_path"] for d in (first, final)]
    assert base_of == [str((tmp_path / "sft" / "best" / BASE_EXPORT_DIR).resolve())] * 2


def test_base_of_a_lora_checkpoint_is_its_frozen_base(base, tmp_path):
    model, _ = base
    original = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = LoRAConfig(rank=2, alpha=4)
    apply_lora(model, cfg, warn_peft=False)
    randomize_adapters(model)
    lora_run = write_dcp(model, tmp_path / "lora_run" / "step_00000003", tmp_path / "bpe" / "tokenizer.json", cfg)
    adapter = write_adapter(lora_state_dict(model), tmp_path / "lora_run" / "adapter", cfg, str(lora_run))
    base_dir = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    from latentforge.model.hf import from_hf_tensors

    exported = from_hf_tensors(read_tensors(base_dir))
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], original[k]) for k in original)


def test_a_hugging_face_base_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    from latentforge.model.hf import save_pretrained

    model = HybridModel(tiny_config(pattern="M*E", mtp_depths=0))
    save_pretrained(model, tmp_path / "hf_base")
    cfg = LoRAConfig(rank=2, alpha=4)
    apply_lora(model, cfg, warn_peft=False)
    monkeypatch.chdir(tmp_path)
    adapter = write_adapter(lora_state_dict(model), tmp_path / "adapter", cfg, "hf_base")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tmp_path / "hf_base"
    )
    assert not (tmp_path / BASE_EXPORT_DIR).exists()
