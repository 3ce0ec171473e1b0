"""torchrun whose SIGTERM means "save and stop": exit code 0 after the workers' clean preemption save.

    python -m latentforge.launch.torchrun --nproc-per-node 2 train/pretrain.py recipe=tiny   # torchrun's arguments

Plain torchrun turns SIGTERM (Slurm's preemption warning, `scancel`) into an exception in its agent: it signals the
workers, waits up to its shutdown timeout, then exits 1 however cleanly they saved, so Slurm marks the job FAILED.
Here the agent keeps monitoring instead: SIGTERM is forwarded to the workers (the trainer's handler sets a flag,
saves at the end of the step and exits 0), and the agent ends with the workers' own result. Workers that do not
exit within the grace period ($TORCH_ELASTIC_SHUTDOWN_TIMEOUT, else 300 s) are killed. SIGINT, SIGHUP and SIGQUIT
keep torchrun's behaviour.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import List

DEFAULT_GRACE_S = 300.0
TORCHRUN_HANDLED = "SIGINT,SIGHUP,SIGQUIT"  # SIGTERM stays ours


def child_pids(parent: int) -> List[int]:
    """The direct children of `parent` (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: the fields after the last ')' are fixed
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == parent:
            pids.append(int(entry))
    return pids


def _signal_all(pids: List[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class TermForwarder:
    """SIGTERM -> the same signal to every worker, then SIGKILL to those still alive after `grace_s`."""

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self._timer = None

    def __call__(self, signum, frame) -> None:
        workers = child_pids(os.getpid())
        print(
            f"latentforge.launch.torchrun: SIGTERM: forwarded to {len(workers)} worker(s); they save and exit "
            f"(killed after {self.grace_s:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
        _signal_all(workers, signal.SIGTERM)
        if self._timer is None:
            self._timer = threading.Timer(self.grace_s, lambda: _signal_all(child_pids(os.getpid()), signal.SIGKILL))
            self._timer.daemon = True
            self._timer.start()


def torchrun_args(argv: List[str]) -> List[str]:
    if any(a.startswith(("--signals-to-handle", "--signals_to_handle")) for a in argv):
        raise SystemExit(
            "latentforge.launch.torchrun: --signals-to-handle is set here (SIGTERM is forwarded to the "
            "workers); leave it out"
        )
    return ["--signals-to-handle", TORCHRUN_HANDLED, *argv]


def main(argv=None) -> int:
    from torch.distributed.run import main as torchrun_main

    args = torchrun_args(sys.argv[1:] if argv is None else list(argv))
    grace = float(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", DEFAULT_GRACE_S))
    signal.signal(signal.SIGTERM, TermForwarder(grace))
    torchrun_main(args)  # raises ChildFailedError (a traceback and exit 1) when a worker failed
    return 0


if __name__ == "__main__":
    sys.exit(main())
