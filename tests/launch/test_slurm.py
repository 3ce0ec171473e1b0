"""launch/pretrain.sbatch as written, on a real Slurm (launch/dev_slurm.sh brings one up on localhost): a CPU node,
the log in the submit directory, resume, the proportional SIGTERM warning ending in exit 0 with a checkpoint, and
`scancel` saving one. The time arithmetic of launch/slurm.py runs everywhere."""

import os
import re
import shutil
import subprocess
import time

import pytest

from latentforge.launch.slurm import parse_slurm_duration, term_delay_s, term_warning_s
from latentforge.train.checkpoint import complete_checkpoints

from ..train.test_pretrain_job import REPO, SMALL

SBATCH = os.path.join(REPO, "launch", "pretrain.sbatch")


@pytest.mark.parametrize(
    "text, seconds",
    [("10", 600), ("9:45", 585), ("1:00:00", 3600), ("1-02:03:04", 93784), ("UNLIMITED", None), ("NOT_SET", None)],
)
def test_slurm_durations(text, seconds):
    assert parse_slurm_duration(text) == seconds


def test_the_warning_is_proportional_to_the_time_limit():
    assert term_warning_s(10 * 60) == 60  # a 10-minute job is warned a minute ahead, not at once
    assert term_warning_s(24 * 3600) == 600
    assert term_warning_s(2 * 60) == 30
    assert term_warning_s(40) == 20  # never more than half the limit
    assert term_delay_s(600, 590) == 530 and term_delay_s(600, 10) == 0
    assert term_delay_s(None, None) is None and term_delay_s(600, 590, before_s=100) == 490


def slurm_unavailable() -> str:
    if shutil.which("sbatch") is None:
        return "sbatch is not on PATH (launch/dev_slurm.sh installs and starts a single-node Slurm)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"sinfo failed: {error}"
    if out.returncode != 0 or not re.search(r"idle|mixed|alloc", out.stdout):
        return f"no Slurm node answers (sinfo: {out.stdout.strip() or out.stderr.strip()!r}); run launch/dev_slurm.sh"
    return ""


def sbatch(submit_dir, env, *args, overrides=(), wait=False):
    cmd = ["sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", *args, SBATCH, *SMALL, *overrides]
    out = subprocess.run(cmd, cwd=submit_dir, env=env, capture_output=True, text=True, timeout=900)
    job = out.stdout.strip().split(";")[0]
    if out.returncode != 0 or not wait:
        return out.returncode, job, out.stderr
    return wait_for_exit(job), job, out.stderr


def wait_for_exit(job: str, timeout_s: float = 900) -> int:
    """The job's exit code once it has ended, polled every half second (`sbatch --wait` backs off to 32 s polls,
    which cost this test about a minute)."""
    deadline = time.time() + timeout_s
    while True:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
        state = re.search(r"JobState=(\S+)", out.stdout)
        code = re.search(r"ExitCode=(\d+):(\d+)", out.stdout)
        assert state and code, f"scontrol knows no job {job}: {out.stdout or out.stderr}"
        if state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED"):
            return int(code.group(1)) or (128 + int(code.group(2)) if int(code.group(2)) else 0)
        assert time.time() < deadline, f"job {job} still {state.group(1)} after {timeout_s} s"
        time.sleep(0.5)


def log_of(submit_dir, job):
    with open(os.path.join(submit_dir, f"latentforge-{job}.out")) as f:
        return f.read()


def stopped_line(log):
    lines = [line for line in log.splitlines() if line.startswith("stopped at step")]
    assert len(lines) == 1, log[-4000:]
    return lines[0], int(lines[0].split()[3].split("/")[0])


@pytest.mark.slow
@pytest.mark.timeout(1500)
@pytest.mark.skipif(bool(slurm_unavailable()), reason=slurm_unavailable() or "slurm present")
def test_sbatch_runs_as_written_resumes_and_saves_on_term(tmp_path):
    env = dict(
        os.environ,
        LATENTFORGE_REPO=REPO,
        LATENTFORGE_CACHE=str(tmp_path / "cache"),
        WANDB_MODE="disabled",
        PYTHONUNBUFFERED="1",
    )
    env["OMP_NUM_THREADS"] = "1"  # the user's value wins over the script's (CPUs per task / ranks)
    submit = str(tmp_path)  # a fresh directory: no logs/ folder exists
    run_dir = str(tmp_path / "run")
    folder = os.path.join(run_dir, "checkpoints")

    rc, job, err = sbatch(
        submit,
        env,
        "--time=10",
        overrides=[f"train.run_dir={run_dir}", "train.steps=2000", "train.stop_at_step=2"],
        wait=True,
    )
    log = log_of(submit, job)
    assert rc == 0, f"{err}\n{log[-4000:]}"
    assert "1 node(s) x 1 rank(s) (0 GPU(s), 2 CPU(s), 1 thread(s) per rank)" in log
    assert [s for s, _ in complete_checkpoints(folder)] == [2]

    # resumed, then the warning before the time limit of a 2-minute job: a checkpoint and exit code 0. The delay is
    # computed from the job's own limit and time left (squeue) as in any job; the warning is moved from its
    # proportional 30 s (the arithmetic is tested above) to 75 s by the documented variable, to wait 45 s, not 90
    rc, job, err = sbatch(
        submit,
        dict(env, LATENTFORGE_TERM_BEFORE_S="75"),
        "--time=2",
        overrides=[f"train.run_dir={run_dir}", "train.steps=2000"],
        wait=True,
    )
    log = log_of(submit, job)
    assert rc == 0, f"{err}\n{log[-4000:]}"
    assert "start      resumed from" in log and "step_00000002" in log
    line, step = stopped_line(log)
    assert "(signal SIGTERM)" in line and step > 2 and complete_checkpoints(folder)[-1][0] == step

    # scancel: SIGTERM to every process of the step; the trainer saves before Slurm's KillWait runs out
    rc, job, err = sbatch(
        submit,
        env,
        "--time=10",
        overrides=[f"train.run_dir={run_dir}", "train.steps=2000", "train.checkpoint_interval=1000"],
    )
    assert rc == 0, err
    log_path = os.path.join(submit, f"latentforge-{job}.out")
    deadline = time.time() + 300
    while not (os.path.exists(log_path) and re.search(r"^step +\d+", open(log_path).read(), flags=re.M)):
        assert time.time() < deadline, "the job did not start training within 300 s"
        time.sleep(1)
    subprocess.run(["scancel", job], check=True)
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        assert time.time() < deadline + 120, "the cancelled job did not end"
        time.sleep(1)
    line, step = stopped_line(log_of(submit, job))
    assert "(signal SIGTERM)" in line and complete_checkpoints(folder)[-1][0] == step
