"""How a sandboxed child is confined: bubblewrap when it works here, POSIX rlimits otherwise.

bwrap: new user, PID, network, IPC and UTS namespaces (`--unshare-all`), the host filesystem read-only, a fresh
size-capped tmpfs at /tmp as the only writable place, `--die-with-parent` so the namespace (and with it every
descendant, `setsid` or not) dies when the sandbox is killed or its program exits. Started as root, the sandbox
drops to `nobody` first where nobody can run this Python, so that RLIMIT_NPROC is enforced (the kernel exempts
root) and counts only the sandbox's own processes (per user namespace); `sandbox_identity` says who runs it.

rlimits (no usable bwrap): memory, CPU time, output size and a scrubbed environment only; `FALLBACK_WARNING` says
what is not contained.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import warnings
from typing import List, Optional

BACKENDS = ("auto", "bwrap", "rlimits")
NOBODY = 65534
FALLBACK_WARNING = (
    "the sandbox runs untrusted code with rlimits only (memory, CPU time, output size) and a scrubbed environment, "
    "because bubblewrap is not usable here ({reason}). NOT contained: network access, writes anywhere the user "
    "can write, descendant processes that leave the program's session (setsid) or outlive it, the number of "
    "processes. Install bubblewrap (apt-get install bubblewrap) for a real sandbox.")


def resolve_backend(requested: str = "auto") -> str:
    """"auto" -> "bwrap" when it works here, else "rlimits" with FALLBACK_WARNING; "bwrap" that does not work is an
    error."""
    if requested not in BACKENDS:
        raise ValueError(f"sandbox backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "rlimits":
        return requested
    problem = bwrap_problem()
    if problem is None:
        return "bwrap"
    if requested == "bwrap":
        raise RuntimeError(f"sandbox backend 'bwrap' requested but bubblewrap is not usable: {problem}")
    warnings.warn(FALLBACK_WARNING.format(reason=problem), RuntimeWarning, stacklevel=3)
    return "rlimits"


@functools.lru_cache(maxsize=1)
def bwrap_problem() -> Optional[str]:
    """None when a bwrap sandbox starts here (probed once per process), else why not."""
    if not sys.platform.startswith("linux"):
        return f"bubblewrap needs Linux, this is {sys.platform}"
    if shutil.which("bwrap") is None:
        return "no `bwrap` on PATH"
    return _probe(sandbox_identity())


def _probe(identity: str) -> Optional[str]:
    command = bwrap_command(1 << 20, identity) + [sys.executable, "-I", "-S", "-c", "pass"]
    try:
        probe = subprocess.run(command, capture_output=True, timeout=60,
                               preexec_fn=child_setup(512, 30, 1 << 20, "bwrap", identity))
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bwrap could not be started ({exc})"
    if probe.returncode != 0:
        return f"bwrap fails here: {probe.stderr.decode(errors='replace').strip()[-300:]}"
    return None


@functools.lru_cache(maxsize=1)
def sandbox_identity() -> str:
    """Who runs sandboxed code. "self": the (non-root) user, in bwrap's user namespace. As root: "nobody" when
    nobody can run this interpreter (RLIMIT_NPROC is then enforced: the kernel exempts uid 0 from it), else
    "root-mapped" (uid 65534 without capabilities inside the namespace, root outside: the process limit does not
    hold, and a warning says so)."""
    if os.geteuid() != 0:
        return "self"
    if shutil.which("bwrap") is not None and _probe("nobody") is None:
        return "nobody"
    warnings.warn(f"running as root and {sys.executable} is not usable by user nobody: sandboxed code runs as root "
                  "outside its user namespace, where the kernel does not enforce RLIMIT_NPROC (max_processes); "
                  "install Python where nobody can read it (or run as a normal user) to limit processes",
                  RuntimeWarning, stacklevel=2)
    return "root-mapped"


def enforces_process_limit() -> bool:
    return bwrap_problem() is None and sandbox_identity() != "root-mapped"


def bwrap_command(scratch_bytes: int, identity: str) -> List[str]:
    """The bwrap prefix of a sandboxed command; /tmp (the child's home and working directory) is its only writable
    place."""
    user = ["--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)] if identity == "root-mapped" else []
    return ["bwrap", "--unshare-all", *user, "--die-with-parent", "--ro-bind", "/", "/", "--proc", "/proc",
            "--dev", "/dev", "--size", str(scratch_bytes), "--tmpfs", "/tmp", "--chdir", "/tmp", "--"]


def child_env(home: str, pythonpath: str = "") -> dict:
    """The whole environment a sandboxed child sees: nothing inherited (no API keys, no tokens)."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
           "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "HOME": home, "TMPDIR": home}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def child_setup(memory_mb: int, cpu_s: float, output_bytes: int, backend: str, identity: str = "self"):
    """The preexec hook of a sandboxed child: its own session (so the whole tree can be killed), rlimits, and
    under bwrap as root, when nobody can run Python: drop to nobody (root is exempt from RLIMIT_NPROC)."""

    def apply():
        import resource

        os.setsid()
        memory = int(memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = max(1, int(cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if backend == "bwrap" and identity == "nobody":
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)

    return apply


def terminating_signal(returncode: Optional[int], backend: str) -> Optional[int]:
    """The signal that ended the child, if one did (bwrap reports a signalled child as exit code 128 + signal)."""
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    if backend == "bwrap" and returncode > 128:
        return returncode - 128
    return None


def kill_tree(proc: subprocess.Popen) -> None:
    """Kill the child's session; under bwrap the PID namespace dies with it (`--die-with-parent`)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()
