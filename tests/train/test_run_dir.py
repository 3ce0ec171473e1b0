"""A run directory belongs to one run: the lock (live, stale, another host), resume=false / overwrite, and
metrics.jsonl holding each step once after a resume."""

import json
import os
import socket
import subprocess
import sys

import pytest

from latentforge.train.callbacks.jsonl import keep_records_up_to, read_jsonl
from latentforge.train.checkpoint import CheckpointManager, pack
from latentforge.train.run_dir import LOCK_FILE, RunDirClaim, RunDirectoryError


def write_lock(run_dir, host, pid):
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, LOCK_FILE), "w") as f:
        json.dump({"host": host, "pid": pid, "since": "earlier"}, f)


def test_the_lock_names_its_holder_and_is_released(tmp_path):
    run_dir = str(tmp_path / "run")
    claim = RunDirClaim.acquire(run_dir, resume=True, overwrite=False)
    holder = json.load(open(os.path.join(run_dir, LOCK_FILE)))
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    claim.release()
    assert not os.path.exists(os.path.join(run_dir, LOCK_FILE))


def test_a_live_holder_refuses_a_second_launch(tmp_path):
    run_dir = str(tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(run_dir, socket.gethostname(), sleeper.pid)
        with pytest.raises(RunDirectoryError, match=f"in use by pid {sleeper.pid} on {socket.gethostname()}"):
            RunDirClaim.acquire(run_dir, resume=True, overwrite=False)
    finally:
        sleeper.kill()
        sleeper.wait()
    # the holder is gone now: its lock is stale and taken over
    claim = RunDirClaim.acquire(run_dir, resume=True, overwrite=False)
    assert json.load(open(os.path.join(run_dir, LOCK_FILE)))["pid"] == os.getpid()
    claim.release()


def test_another_hosts_lock_cannot_be_judged_from_here(tmp_path):
    run_dir = str(tmp_path / "run")
    write_lock(run_dir, "some-other-node", 12345)
    with pytest.raises(RunDirectoryError, match="pid 12345 on some-other-node .* remove the lock file"):
        RunDirClaim.acquire(run_dir, resume=True, overwrite=False)


def old_run(run_dir):
    CheckpointManager(os.path.join(run_dir, "checkpoints")).save(3, {"trainer": pack({"step": 3})})
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.write('{"step": 1}\n')


def test_resume_false_on_an_old_run_needs_overwrite_which_moves_it_aside(tmp_path):
    run_dir = str(tmp_path / "run")
    old_run(run_dir)
    with pytest.raises(
        RunDirectoryError, match="train.resume=false but .* holds an earlier run .*train.overwrite=true"
    ):
        RunDirClaim.acquire(run_dir, resume=False, overwrite=False)
    assert not os.path.exists(os.path.join(run_dir, LOCK_FILE))  # a refused launch keeps no lock

    claim = RunDirClaim.acquire(run_dir, resume=False, overwrite=True)
    aside = [n for n in os.listdir(run_dir) if n.startswith("old-")]
    assert len(aside) == 1 and not os.path.exists(os.path.join(run_dir, "checkpoints"))
    assert sorted(os.listdir(os.path.join(run_dir, aside[0]))) == ["checkpoints", "metrics.jsonl"]
    claim.release()


def test_a_refused_launch_leaves_no_new_directory(tmp_path):
    run_dir = str(tmp_path / "fresh")
    write_lock(str(tmp_path / "other"), "x", 1)  # unrelated
    os.makedirs(run_dir)
    write_lock(run_dir, "some-other-node", 1)
    with pytest.raises(RunDirectoryError):
        RunDirClaim.acquire(run_dir, resume=True, overwrite=False)
    assert os.listdir(run_dir) == [LOCK_FILE]  # the other launch's lock, untouched


def test_metrics_after_a_resume_hold_each_step_once(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        for step in range(1, 7):
            f.write(json.dumps({"step": step, "loss": float(step)}) + "\n")
        f.write('{"step": 7, "lo')  # cut short by a kill
    keep_records_up_to(path, 4)  # resumed from step 4: steps 5, 6 will be trained again
    assert [r["step"] for r in read_jsonl(path)] == [1, 2, 3, 4]
