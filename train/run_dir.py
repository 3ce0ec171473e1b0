"""A run directory belongs to one run: a lock names the launch using it, and starting over is asked for explicitly.

    claim = RunDirClaim.acquire(run_dir, resume=..., overwrite=...)   # rank 0, before anything else is written
    ...                                                                # the launch is accepted: write config.yaml
    claim.release()

The lock (`<run_dir>/.lock`, JSON with host and pid) is created with O_EXCL, so two launches cannot both take it.
A lock left by a process that is gone (same host, pid no longer running) is stale and taken over; a lock of another
host cannot be checked from here and is reported with the command that removes it. `train.resume=false` on a run
directory holding checkpoints is refused unless `train.overwrite=true`, which moves the old run's checkpoints and
metrics aside into `<run_dir>/old-<time>/` (nothing is deleted).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

from latentforge.model.errors import UserError
from latentforge.model.hf import complete_checkpoints

LOCK_FILE = ".lock"
# what a previous run leaves that a new one would otherwise resume from or append to
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "best", "adapter", "hf", "accuracy.json", "config.yaml", "wandb")


class RunDirectoryError(UserError):
    """The run directory is in use by another launch, or holds a run this launch would silently continue."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_lock(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written or damaged: treated as stale below


def _is_stale(holder: dict) -> bool:
    if not holder:
        return True
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process: cannot be checked from here
    pid = holder.get("pid")
    return not isinstance(pid, int) or (pid != os.getpid() and not _alive(pid))


def _create_lock(path: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
    return True


class RunDirClaim:
    def __init__(self, run_dir: str, lock_path: str, created_dir: bool):
        self.run_dir = run_dir
        self.lock_path = lock_path
        self._created_dir = created_dir

    @classmethod
    def acquire(cls, run_dir: str, resume: bool, overwrite: bool) -> "RunDirClaim":
        """Lock `run_dir` for this process, then apply the resume policy. Raises RunDirectoryError (the lock is not
        kept) when another live launch holds it or when resume=false would mix two runs."""
        created = not os.path.isdir(run_dir)
        os.makedirs(run_dir, exist_ok=True)
        claim = cls(run_dir, os.path.join(run_dir, LOCK_FILE), created)
        claim._take_lock()
        try:
            claim._apply_resume_policy(resume, overwrite)
        except BaseException:
            claim.release(rejected=True)
            raise
        return claim

    def _take_lock(self) -> None:
        for _ in range(3):  # a stale lock is removed, then created again with O_EXCL: one of two racers wins
            if _create_lock(self.lock_path):
                return
            holder = read_lock(self.lock_path)
            if holder is None:
                continue
            if not _is_stale(holder):
                raise RunDirectoryError(
                    f"run directory {self.run_dir} is in use by pid {holder.get('pid')} on {holder.get('host')} "
                    f"(since {holder.get('since')}; lock {self.lock_path}): use another train.run_name / "
                    "train.run_dir, or stop that run. If it is gone (another host, crashed), remove the lock file"
                )
            try:
                os.remove(self.lock_path)
            except FileNotFoundError:
                pass
        raise RunDirectoryError(f"could not take the lock {self.lock_path}: another launch keeps taking it")

    def _apply_resume_policy(self, resume: bool, overwrite: bool) -> None:
        if resume:
            return
        old = [name for name in RUN_OUTPUTS if os.path.exists(os.path.join(self.run_dir, name))]
        if not complete_checkpoints(os.path.join(self.run_dir, "checkpoints")) and "metrics.jsonl" not in old:
            return
        if not overwrite:
            raise RunDirectoryError(
                f"train.resume=false but {self.run_dir} holds an earlier run ({', '.join(old)}): its checkpoints "
                "would be resumed by the next normal launch. Pass train.overwrite=true to move them aside and start "
                "over, drop train.resume=false to continue that run, or choose a new train.run_name"
            )
        aside = os.path.join(self.run_dir, "old-" + time.strftime("%Y%m%d-%H%M%S"))
        os.makedirs(aside, exist_ok=True)
        for name in old:
            os.replace(os.path.join(self.run_dir, name), os.path.join(aside, name))
        print(f"train.overwrite=true: moved the earlier run's {', '.join(old)} to {aside}", flush=True)

    def release(self, rejected: bool = False) -> None:
        holder = read_lock(self.lock_path)
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            os.remove(self.lock_path)
        if rejected and self._created_dir:
            try:
                os.rmdir(self.run_dir)  # only when empty: a rejected launch leaves no trace
            except OSError:
                pass


def claim_run_dir(run_dir: str, train_cfg) -> Optional[RunDirClaim]:
    """Collective: rank 0 takes the run directory; every rank raises the same RunDirectoryError when it cannot."""
    from latentforge.train import distributed as world

    claim, refusal = None, None
    if world.rank() == 0:
        try:
            claim = RunDirClaim.acquire(run_dir, resume=train_cfg.resume, overwrite=train_cfg.overwrite)
        except RunDirectoryError as error:
            refusal = str(error)
    refusal = world.broadcast_object(refusal)
    if refusal is not None:
        raise RunDirectoryError(refusal)
    return claim
