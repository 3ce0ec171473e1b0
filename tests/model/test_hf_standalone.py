"""`python -m latentforge.model.hf export` and `latentforge-export` write exports that stand alone: the tokenizer
files next to the weights (transformers loads tokenizer, chat template and generation config from the directory);
a tekken run, which records its tokenizer in config.yaml rather than as a file, is recognised; a checkpoint that
records none exports with a warning naming --tokenizer."""

import json
import os

import pytest
import torch

from latentforge.data.hf_tokenizer import checkpoint_tokenizer
from latentforge.data.tokenizer import TekkenTokenizer, train_bpe
from latentforge.model import HybridModel
from latentforge.model.hf import main as hf_main
from latentforge.train.export import main as export_main
from tests.model.test_hf import tiny_config
from tests.train.test_lora_base import write_dcp

transformers = pytest.importorskip("transformers")

STANDALONE = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"}


@pytest.fixture
def checkpoint(tmp_path):
    tokenizer = train_bpe(["the quick brown fox jumps over the lazy dog\n" * 30], 300, str(tmp_path / "bpe.json"))
    torch.manual_seed(0)
    model = HybridModel(tiny_config(pattern="M*", vocab_size=300, mtp_depths=0))
    return write_dcp(model, tmp_path / "run" / "checkpoints" / "step_00000002", tokenizer.path)


@pytest.mark.parametrize("cli", [hf_main, export_main], ids=["model.hf", "train.export"])
def test_export_cli_writes_a_standalone_directory(checkpoint, tmp_path, cli):
    from transformers import AutoTokenizer, GenerationConfig

    out = tmp_path / "out"
    argv = ["export", str(checkpoint.parent.parent), str(out)] if cli is hf_main else [str(checkpoint), str(out)]
    assert cli(argv) == 0
    assert STANDALONE <= set(os.listdir(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "user", "content": "the fox"}]
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        == "<|im_start|>user\nthe fox<|im_end|>\n"
        "<|im_start|>assistant\n<think></think>"
    )
    assert GenerationConfig.from_pretrained(str(out)).eos_token_id == [2, 11]


def test_tekken_is_found_in_config_yaml_and_a_missing_tokenizer_warns(checkpoint, tmp_path):
    (checkpoint / "tokenizer.json").unlink()
    with pytest.warns(UserWarning, match="--tokenizer"):
        assert hf_main(["export", str(checkpoint), str(tmp_path / "bare")]) == 0
    assert json.loads((tmp_path / "bare" / "generation_config.json").read_text())["eos_token_id"] == [2, 11]
    assert not (tmp_path / "bare" / "tokenizer.json").exists()
    (checkpoint / "config.yaml").write_text("data:\n  tokenizer:\n    kind: tekken\n    path: null\n")
    assert isinstance(checkpoint_tokenizer(checkpoint), TekkenTokenizer)
    assert checkpoint_tokenizer(checkpoint, str(tmp_path / "bpe.json")).kind == "hf"  # --tokenizer wins
