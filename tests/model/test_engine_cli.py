"""`python -m latentforge.rl.generate`: loads a Hugging Face export or a trainer's DCP checkpoint with the tokenizer it records,
renders the chat template, and prints the engine's greedy completion (checked against full forwards)."""

import json
import os
import shutil
import warnings

import pytest
import torch

from latentforge.rl import generate as cli
from tests.model.test_engine import make_model, reference_greedy
from tests.model.test_engine_sampling import _single_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    from latentforge.data.tokenizer import train_bpe

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    texts = ["What is 3 + 4 * 5? First the multiplication: 4 * 5 = 20. Then 3 + 20 = 23. Answer: 23"] * 20
    train_bpe(texts, vocab_size=300, save_path=str(path))
    return str(path)


def expected_text(model, tokenizer, prompt, think, max_new):
    ids = cli.prompt_ids(tokenizer, prompt, chat=True, think=think)
    tokens = reference_greedy(model, ids, max_new, stop=(tokenizer.im_end_id, tokenizer.eod_id))
    return ids, tokenizer.decode(tokens)


@pytest.mark.parametrize("think", [True, False])
def test_cli_on_a_hugging_face_export(tmp_path, tokenizer_file, capsys, think):
    from latentforge.data.tokenizer import load_tokenizer
    from latentforge.model.hf import save_pretrained

    model = make_model(torch.float32, vocab_size=300)
    save_pretrained(model, tmp_path / "hf")
    shutil.copyfile(tokenizer_file, tmp_path / "hf" / "tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_file)
    ids, text = expected_text(model, tokenizer, "What is 2 + 2?", think, 6)
    assert ids[-1] == (tokenizer.think_id if think else tokenizer.think_end_id)  # the template's reasoning switch
    cli.main(
        [
            f"ckpt={tmp_path / 'hf'}",
            "prompt=What is 2 + 2?",
            f"think={str(think).lower()}",
            "max_new_tokens=6",
            "draft_tokens=2",
            "stats=true",
        ]
    )
    out, err = capsys.readouterr()
    assert out == text + "\n"
    assert json.loads(err.strip().splitlines()[-1])["draft_tokens"] == 2


def test_cli_on_a_dcp_checkpoint(tmp_path, tokenizer_file, capsys):
    pytest.importorskip(
        "latentforge.train.export", reason="the trainer's DCP loader (train/export.py) is not in this checkout"
    )
    import torch.distributed.checkpoint as dcp

    from latentforge.data.tokenizer import load_tokenizer

    model = make_model(torch.float32, vocab_size=300)
    step = tmp_path / "run" / "checkpoints" / "step_00000005"
    with warnings.catch_warnings():  # DCP notes that it saves without a process group: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(step), no_dist=True)
    (step / "model_config.json").write_text(json.dumps(model.cfg.to_dict()))
    shutil.copyfile(tokenizer_file, step / "tokenizer.json")
    tokenizer = load_tokenizer(tokenizer_file)
    _, text = expected_text(model, tokenizer, "Hi", True, 5)
    cli.main([f"ckpt={tmp_path / 'run'}", "prompt=Hi", "max_new_tokens=5"])  # a run directory: newest step
    assert capsys.readouterr().out == text + "\n"


def test_cli_names_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown option\(s\) \['promt'\]; options: .*prompt"):
        cli.main(["ckpt=x", "promt=hi"])
    with pytest.raises(SystemExit, match="max_new_tokens must be an integer, got 'many'"):
        cli.main(["ckpt=x", "max_new_tokens=many"])
    with pytest.raises(SystemExit, match="think must be true or false, got 'no'"):
        cli.main(["ckpt=x", "think=no"])
    with pytest.raises(SystemExit, match="no such directory"):
        cli.main([f"ckpt={tmp_path / 'missing'}", "prompt=hi"])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="neither a Hugging Face directory"):
        cli.main([f"ckpt={tmp_path / 'empty'}", "prompt=hi"])
