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
    cli.main([f"ckpt={tmp_path / 'run'}", "prompt=Hi", "max_new_tokens=5", "stats=true"])  # a run dir: newest step
    out, err = capsys.readouterr()
    assert out == text + "\n"
    assert json.loads(err.strip().splitlines()[-1])["draft_tokens"] == model.cfg.mtp_depths > 0  # drafts unless told


def test_cli_names_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match=r"unknown option\(s\) \['promt'\]; options: .*prompt"):
        cli.main(["ckpt=x", "promt=hi"])
    with pytest.raises(SystemExit, match=r"^sampling\.max_new_tokens must be an integer, got 'many'$"):
        cli.main(["ckpt=x", "max_new_tokens=many"])
    with pytest.raises(SystemExit, match=r"^sampling\.temperature must be a number, got 'hot'$"):
        cli.main(["ckpt=x", "sampling.temperature=hot"])
    with pytest.raises(SystemExit, match=r"^sampling: SamplingParams\.top_p must be in \(0, 1\], got 1\.5$"):
        cli.main(["ckpt=x", "top_p=1.5"])
    with pytest.raises(SystemExit, match=r"^engine: EngineConfig\.draft_tokens must be >= 0, got -1$"):
        cli.main(["ckpt=x", "draft_tokens=-1"])
    with pytest.raises(SystemExit, match="think must be true or false, got 'no'"):
        cli.main(["ckpt=x", "think=no"])
    with pytest.raises(SystemExit, match="no such directory"):
        cli.main([f"ckpt={tmp_path / 'missing'}", "prompt=hi"])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="neither a Hugging Face directory"):
        cli.main([f"ckpt={tmp_path / 'empty'}", "prompt=hi"])


def test_cli_options_are_the_sampling_and_engine_configs():
    """The command's sampling and engine options are SamplingParams and EngineConfig fields, with those classes'
    defaults except greedy sampling and one slot; flat keys (as documented) and dotted ones land in them."""
    from dataclasses import fields

    from latentforge.model.engine import EngineConfig, SamplingParams

    restated = {f.name for f in fields(cli.GenerateArgs)} & (
        {f.name for f in fields(SamplingParams)} | {f.name for f in fields(EngineConfig)}
    )
    assert not restated, f"GenerateArgs restates sampling / engine fields: {restated}"
    plain = cli.parse_key_values([], cli.GenerateArgs)
    assert plain.sampling == SamplingParams(temperature=0.0) and plain.engine == EngineConfig(max_batch=1)
    args = cli.parse_key_values(
        ["max_new_tokens=64", "temperature=0.7", "draft_tokens=3", "seed=5", "sampling.top_p=0.9", "engine.seed=2"],
        cli.GenerateArgs,
    )
    assert args.sampling == SamplingParams(temperature=0.7, max_new_tokens=64, seed=5, top_p=0.9)
    assert args.engine == EngineConfig(max_batch=1, draft_tokens=3, seed=2)  # a flat seed is the request's


def test_documented_command_lines_parse():
    """Every `python -m latentforge.rl.generate ...` line of the module docstring and README.md parses."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    lines = re.findall(r"python -m latentforge\.rl\.generate (.*)", (cli.__doc__ or "") + readme)
    examples = [line for line in lines if "<" not in line and not line.startswith("...")]  # not placeholders
    commands = [shlex.split(line.split("#")[0]) for line in examples]
    assert len(commands) >= 4
    for argv in commands:
        cli.parse_key_values(argv, cli.GenerateArgs)
