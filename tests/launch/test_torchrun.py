"""Real torchrun, 2 CPU workers on the tiny recipe: SIGTERM to every process (as Slurm sends it) ends in a saved
checkpoint and exit code 0 through latentforge.launch.torchrun; `kill -9` of plain torchrun's process group leaves
no orphan worker (they arm PR_SET_PDEATHSIG)."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from latentforge.launch.torchrun import child_pids
from latentforge.model.manifest import MANIFEST_FILE
from latentforge.train.callbacks.jsonl import read_jsonl
from latentforge.train.checkpoint import complete_checkpoints

from ..train.test_pretrain_job import PRETRAIN, REPO, SMALL, env  # noqa: F401 - env is a fixture

WAIT_S = 300
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")


def torchrun(*overrides, wrapper=True):
    launcher = ["-m", "latentforge.launch.torchrun"] if wrapper else ["-m", "torch.distributed.run"]
    return [sys.executable, *launcher, "--standalone", "--nproc-per-node=2", PRETRAIN, *SMALL, *overrides]


def wait_for(predicate, proc, what):
    deadline = time.time() + WAIT_S
    while not predicate():
        assert proc.poll() is None, f"torchrun ended before {what}:\n{proc.stdout.read()[-4000:]}"
        assert time.time() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.1)


def test_child_pids_reads_proc():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in child_pids(os.getpid())
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_sigterm_saves_and_exits_0_and_kill_9_leaves_no_orphans(tmp_path, env):
    run_dir = str(tmp_path / "run")
    folder = os.path.join(run_dir, "checkpoints")
    proc = subprocess.Popen(
        torchrun(f"train.run_dir={run_dir}", "train.steps=2000", "train.checkpoint_interval=2"),
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: complete_checkpoints(folder), proc, "a checkpoint")
        workers = child_pids(proc.pid)
        assert len(workers) == 2
        for pid in [proc.pid, *workers]:  # Slurm signals every process of the step
            os.kill(pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, out[-4000:]
    stopped = [line for line in out.splitlines() if line.startswith("stopped at step")]
    assert len(stopped) == 1 and "(signal SIGTERM)" in stopped[0], out[-4000:]
    step = int(stopped[0].split()[3].split("/")[0])
    newest = complete_checkpoints(folder)[-1]
    assert newest[0] == step and os.path.isfile(os.path.join(newest[1], MANIFEST_FILE))

    # plain torchrun resumes it; kill -9 of its process group (the workers run in sessions of their own)
    proc = subprocess.Popen(
        torchrun(f"train.run_dir={run_dir}", "train.steps=2000", wrapper=False),
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    workers = []
    try:
        # training again (past init_distributed, where the workers arm PR_SET_PDEATHSIG): new metrics records
        wait_for(lambda: len(read_jsonl(os.path.join(run_dir, "metrics.jsonl"))) > step, proc, "a resumed step")
        workers = [psutil.Process(pid) for pid in child_pids(proc.pid)]
        assert len(workers) == 2 and all(os.getsid(w.pid) != os.getsid(proc.pid) for w in workers)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, f"orphan workers outlived torchrun: {alive}"
    finally:
        for w in workers:
            if w.is_running():
                w.kill()
