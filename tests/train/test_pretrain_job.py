"""`train/pretrain.py` as people run it, in subprocesses: kill -9 and exact resume, the 2-process main job with its
checkpoint and Hugging Face export, a checkpoint from 2 processes resumed on 1, the dry-run plan."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from latentforge.train.callbacks.jsonl import read_jsonl
from latentforge.train.checkpoint import complete_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRETRAIN = os.path.join(REPO, "train", "pretrain.py")
# tiny sizes: a small slice of the embedded corpus and its own small BPE, short sequences
SMALL = [
    "recipe=tiny",
    "train.seq_len=64",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
    "data.stdlib_max_mb=1",
    "data.tokenizer.train_max_mb=1",
    "train.log_interval=1",
    "train.progress_bar=false",
    "optim.warmup_steps=2",
    "train.export_hf=false",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    values = dict(os.environ)
    values.update(
        LATENTFORGE_CACHE=str(tmp_path_factory.mktemp("cache")),
        WANDB_MODE="disabled",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    return values


def pretrain_cmd(*overrides, nproc=None):
    if nproc is None:
        return [sys.executable, PRETRAIN, *SMALL, *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        PRETRAIN,
        *SMALL,
        *overrides,
    ]


def run(cmd, env, timeout=420):
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc.stdout


def losses_by_step(run_dir):
    """The last record of every step (a resumed run appends after the records of the run it continues)."""
    return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))}


def test_kill_9_then_resume_matches_an_uninterrupted_run_bitwise(tmp_path, env):
    straight = str(tmp_path / "straight")
    run(pretrain_cmd(f"train.run_dir={straight}", "train.steps=40", "train.stop_at_step=8"), env)

    killed = str(tmp_path / "killed")
    # the same run (40 steps, so the schedule is the same) saving every 3 steps, killed -9 once a save is complete
    proc = subprocess.Popen(
        pretrain_cmd(f"train.run_dir={killed}", "train.steps=40", "train.checkpoint_interval=3"),
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 300
        while not complete_checkpoints(os.path.join(killed, "checkpoints")):
            assert proc.poll() is None, f"the run ended before its first checkpoint:\n{proc.stdout.read()[-4000:]}"
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    saved_step = complete_checkpoints(os.path.join(killed, "checkpoints"))[-1][0]
    assert 3 <= saved_step < 8

    out = run(
        pretrain_cmd(
            f"train.run_dir={killed}", "train.steps=40", "train.stop_at_step=8", "train.checkpoint_interval=3"
        ),
        env,
    )
    assert f"resumed from {os.path.join(killed, 'checkpoints', f'step_{saved_step:08d}')}" in out
    expected = losses_by_step(straight)
    got = losses_by_step(killed)
    assert sorted(expected) == list(range(1, 9)) and sorted(got) == list(range(1, 9))
    assert [got[s] for s in range(1, 9)] == [expected[s] for s in range(1, 9)]  # bitwise


def test_main_job_two_processes_then_resume_on_one(tmp_path, env):
    main_run = str(tmp_path / "main")
    out = run(
        pretrain_cmd(
            f"train.run_dir={main_run}",
            "train.steps=16",
            "train.checkpoint_interval=8",
            "train.export_hf=true",
            nproc=2,
        ),
        env,
    )
    step_lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 16, out  # one console line per step, from one rank
    assert "TFLOP/s n/a" in step_lines[0] and "MFU n/a" in step_lines[0] and "tok/s" in step_lines[0]
    losses = losses_by_step(main_run)
    assert sorted(losses) == list(range(1, 17))
    first, last = sum(losses[s] for s in (1, 2, 3)) / 3, sum(losses[s] for s in (14, 15, 16)) / 3
    assert last < first - 1.0, losses  # the loss falls

    checkpoints = complete_checkpoints(os.path.join(main_run, "checkpoints"))
    assert [s for s, _ in checkpoints] == [8, 16]
    final = checkpoints[-1][1]
    assert {"model_config.json", "config.yaml", "tokenizer.json"} <= set(os.listdir(final))

    from latentforge.model import hf
    from latentforge.train.export import load_model_from_checkpoint

    exported = hf.load_pretrained(os.path.join(main_run, "hf"))
    from_dcp = load_model_from_checkpoint(final)
    for (name, a), b in zip(from_dcp.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name
    assert os.path.isfile(os.path.join(main_run, "hf", "tokenizer.json"))
    # the documented CLI, in its own process: `python -m latentforge.model.hf export RUN_DIR OUT` (newest checkpoint)
    run([sys.executable, "-m", "latentforge.model.hf", "export", main_run, str(tmp_path / "cli_export")], env)
    from latentforge.train.export import main as export_main

    assert export_main([final, str(tmp_path / "train_export")]) == 0  # `python -m latentforge.train.export CKPT OUT`
    for folder in ("cli_export", "train_export"):
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            with open(os.path.join(main_run, "hf", name), "rb") as a, open(tmp_path / folder / name, "rb") as b:
                assert a.read() == b.read(), (folder, name)

    # the FSDP=2 checkpoint of step 8, continued by one process: the same losses up to reduction order
    one = str(tmp_path / "one")
    os.makedirs(os.path.join(one, "checkpoints"))
    shutil.copytree(checkpoints[0][1], os.path.join(one, "checkpoints", os.path.basename(checkpoints[0][1])))
    out = run(pretrain_cmd(f"train.run_dir={one}", "train.steps=16", "train.checkpoint_interval=8"), env)
    assert "resumed from" in out
    continued = losses_by_step(one)
    assert sorted(continued) == list(range(9, 17))
    assert [continued[s] for s in range(9, 17)] == pytest.approx([losses[s] for s in range(9, 17)], rel=1e-4)


def test_dry_run_prints_the_super_120b_plan(capsys):
    from latentforge.train.pretrain import main

    assert main(["recipe=super_120b", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "world 64" in out and "pp 2" in out and "ep 32" in out and "tp 1" in out
    assert "123,611,033,088 parameters" in out
    assert out.count("params per GPU") == 2 and out.count("peak per GPU") == 2 and "GiB" in out


def test_a_layout_that_does_not_divide_fails_at_start(capsys):
    from latentforge.train.parallel.config import LayoutError
    from latentforge.train.pretrain import main

    with pytest.raises(LayoutError, match="num_key_value_heads"):
        main.__wrapped__(["recipe=tiny", "parallel.tp=4", "--dry-run", "--world-size", "4"])
    # the console script: one line naming the problem, exit code 2, no traceback
    assert main(["recipe=tiny", "parallel.tp=4", "--dry-run", "--world-size", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("latentforge-pretrain: error: parallel.tp (4) must divide")
