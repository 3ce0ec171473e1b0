"""`train/pretrain.py` in subprocesses, failing as clusters make it fail: Slurm's SIGTERM to the trainer and the W&B
service together, a second launch on a run directory in use, launches refused before they write anything."""

import os
import signal
import subprocess
import time

import psutil
import pytest

from latentforge.model.manifest import MANIFEST_FILE
from latentforge.train.checkpoint import complete_checkpoints

from .test_pretrain_job import env, pretrain_cmd  # noqa: F401 - env is a fixture

WAIT_S = 240


def wait_for(predicate, proc, what):
    deadline = time.time() + WAIT_S
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}:\n{proc.stdout.read()[-4000:]}"
        assert time.time() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.1)


def launch(cmd, env):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wandb_service(pid):
    return [p for p in psutil.Process(pid).children(recursive=True) if p.name().startswith("wandb")]


def test_sigterm_to_trainer_and_wandb_service_saves_and_exits_0(tmp_path, env):
    run_dir = str(tmp_path / "run")
    wandb_env = dict(env, WANDB_MODE="offline", WANDB_SILENT="true")
    # an earlier test in this process may have started W&B, which exports WANDB_SERVICE: a child would then attach
    # to that service instead of starting its own, and there would be no service of the run's to signal
    wandb_env.pop("WANDB_SERVICE", None)
    # checkpoint_interval 2: at least one complete checkpoint exists while it runs, so the stop must add its own
    proc = launch(
        pretrain_cmd(
            f"train.run_dir={run_dir}", "train.steps=2000", "train.checkpoint_interval=2", "train.wandb.enabled=true"
        ),
        wandb_env,
    )
    try:
        wait_for(
            lambda: complete_checkpoints(os.path.join(run_dir, "checkpoints")) and wandb_service(proc.pid),
            proc,
            "a checkpoint and the W&B service",
        )

        # a second launch on the same run directory is refused in one line, while the first holds it
        second = subprocess.run(
            pretrain_cmd(f"train.run_dir={run_dir}", "train.steps=2000"),
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.strip().splitlines() == [
            line for line in second.stderr.strip().splitlines() if line.startswith("latentforge-pretrain: error:")
        ]
        assert f"is in use by pid {proc.pid}" in second.stderr

        # as Slurm does at preemption or scancel: SIGTERM to every process of the step at once
        targets = [proc.pid] + [p.pid for p in wandb_service(proc.pid)]
        for pid in targets:
            os.kill(pid, signal.SIGTERM)
        sent = time.time()
        out, _ = proc.communicate(timeout=60)
        took = time.time() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    assert took < 30, f"took {took:.1f}s to stop"
    stopped = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and "(signal SIGTERM)" in stopped[0], out[-3000:]
    step = int(stopped[0].split()[3].split("/")[0])
    newest = complete_checkpoints(os.path.join(run_dir, "checkpoints"))[-1]
    assert newest[0] == step and os.path.isfile(os.path.join(newest[1], MANIFEST_FILE))
    assert not os.path.exists(os.path.join(run_dir, ".lock"))


@pytest.mark.slow
def test_refused_launches_write_nothing(tmp_path, env):
    run_dir = str(tmp_path / "run")
    first = subprocess.run(
        pretrain_cmd(f"train.run_dir={run_dir}", "train.steps=2"),
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
    )
    assert first.returncode == 0, first.stderr[-3000:]
    config = os.path.join(run_dir, "config.yaml")
    before = open(config).read()

    for overrides, message in [
        (["train.resume=false"], "train.resume=false but"),
        # another tokenizer than the checkpoint's: refused by the resume, after the lock, before config.yaml
        (["data.tokenizer.vocab_size=2048"], "error: checkpoint"),
    ]:
        refused = subprocess.run(
            pretrain_cmd(f"train.run_dir={run_dir}", "train.steps=4", *overrides),
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT_S,
        )
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr
        assert open(config).read() == before
        assert sorted(os.listdir(run_dir)) == ["checkpoints", "config.yaml", "metrics.jsonl"]
