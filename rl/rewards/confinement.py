"""How a sandboxed child is confined: bubblewrap when it works here, POSIX rlimits otherwise.

bwrap: new PID, network, IPC and UTS namespaces (and a user namespace unless started as root), the host
filesystem read-only, a fresh size-capped tmpfs at /tmp as the only writable place, `--die-with-parent` so the
namespace (and with it every descendant, `setsid` or not) dies when the sandbox is killed or its program exits;
/root and $HOME are empty but for the interpreter, LatentForge and the caller's import path. Started as root, the
child switches to an unprivileged uid of its own (like nobody, but one per sandbox) before running anything
untrusted, so that RLIMIT_NPROC is enforced (the kernel exempts root) and counts only that sandbox's processes;
`sandbox_identity` says who runs it.

rlimits (no usable bwrap): memory, CPU time, output size and a scrubbed environment only; `FALLBACK_WARNING` says
what is not contained.
"""

from __future__ import annotations

import functools
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import warnings
from typing import List, Optional

BACKENDS = ("auto", "bwrap", "rlimits")
NOBODY = 65534
PRIVATE_UIDS = (2_000_000_000, 100_000_000)  # first uid, how many: unused by any real account
CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
FALLBACK_WARNING = (
    "the sandbox runs untrusted code with rlimits only (memory, CPU time, output size) and a scrubbed environment, "
    "because bubblewrap is not usable here ({reason}). NOT contained: network access, writes anywhere the user "
    "can write, descendant processes that leave the program's session (setsid), files readable by the user "
    "(credentials in the home directory), the number of processes. Install bubblewrap (apt-get install "
    "bubblewrap) for a real sandbox."
)


def resolve_backend(requested: str = "auto") -> str:
    """ "auto" -> "bwrap" when it works here, else "rlimits" with FALLBACK_WARNING; "bwrap" that does not work is an
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
    # imports after the switch to an unprivileged uid: the standard library must be readable by anyone
    code = "import json, resource, ctypes"
    command = bwrap_command(1 << 20, identity) + child_command(
        identity,
        ("-I", "-S"),
        "program",
        code,
        memory_mb=512,
        cpu_s=30,
        output_bytes=1 << 20,
        max_processes=0,
        shield=False,
    )
    try:
        probe = subprocess.run(command, capture_output=True, timeout=60, start_new_session=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bwrap could not be started ({exc})"
    if probe.returncode != 0:
        return f"bwrap fails here: {probe.stderr.decode(errors='replace').strip()[-300:]}"
    return None


@functools.lru_cache(maxsize=1)
def sandbox_identity() -> str:
    """Who runs sandboxed code under bwrap. "self": the (non-root) user, in bwrap's user namespace. As root:
    "private-uid" (bwrap keeps root only to set the sandbox up; the child switches to a fresh unprivileged uid
    before running anything untrusted, so RLIMIT_NPROC holds, per sandbox: the kernel exempts uid 0 from it) when
    an unprivileged user can run this interpreter, else "root-mapped" (uid 65534 in a user namespace, still root
    outside: the process limit does not hold, and a warning says so)."""
    if os.geteuid() != 0:
        return "self"
    if shutil.which("bwrap") is not None and _probe("private-uid") is None:
        return "private-uid"
    warnings.warn(
        f"running as root and {sys.executable} is not usable by an unprivileged user: sandboxed code "
        "runs as root outside its user namespace, where the kernel does not enforce RLIMIT_NPROC "
        "(max_processes); install Python where anyone can read it (or run as a normal user) to limit "
        "processes",
        RuntimeWarning,
        stacklevel=2,
    )
    return "root-mapped"


def enforces_process_limit() -> bool:
    return bwrap_problem() is None and sandbox_identity() != "root-mapped"


def child_command(
    identity: str,
    python_flags,
    mode: str,
    payload: str,
    *,
    memory_mb: int,
    cpu_s: float,
    output_bytes: int,
    max_processes: int,
    shield: bool,
) -> list:
    """The sandboxed interpreter running sandbox_child.py (see there for the arguments)."""
    drop_to = PRIVATE_UIDS[0] + secrets.randbelow(PRIVATE_UIDS[1]) if identity == "private-uid" else -1
    limits = [int(memory_mb) << 20, max(1, int(cpu_s + 1)), int(output_bytes), int(max_processes)]
    return [
        sys.executable,
        *python_flags,
        CHILD_SCRIPT,
        mode,
        *map(str, limits),
        "1" if shield else "0",
        str(drop_to),
        payload,
    ]


def _hidden_homes() -> List[str]:
    """Home directories the sandbox sees as empty: they hold credentials (.netrc, cloud and hub tokens, ssh keys)."""
    homes = {"/root", os.path.expanduser("~")}
    return sorted(h for h in homes if os.path.isdir(h) and h not in ("/", "/tmp"))


def _visible_paths(extra_paths) -> List[str]:
    """What the child needs even where it lies in a hidden directory (a home, /tmp): this interpreter and its
    libraries, LatentForge itself, and `extra_paths` (the caller's import path, for reward functions)."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(CHILD_SCRIPT)))
    candidates = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(sys.executable),
        os.path.dirname(os.path.realpath(sys.executable)),
        package_root,
        *extra_paths,
    ]
    return sorted({os.path.abspath(p) for p in candidates if p and os.path.exists(p)})


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _mounts(scratch_bytes: int, extra_paths) -> List[str]:
    """Hide the homes and /tmp (fresh tmpfs), show the visible paths inside them read-only, parents before
    children, so that a home inside a shown folder is hidden again and a path inside that home shown again."""
    ops = [(h, "hide") for h in _hidden_homes() + ["/tmp"]] + [(p, "show") for p in _visible_paths(extra_paths)]
    ops.sort(key=lambda op: (op[0].rstrip(os.sep).split(os.sep), op[1] == "show"))
    mounts, done, made = [], [], set()
    for path, kind in ops:
        # the innermost earlier operation on a folder holding `path` (the later one where a folder has two)
        enclosing = max((d for d in reversed(done) if _inside(path, d[0])), key=lambda d: len(d[0]), default=None)
        if kind == "show" and (enclosing is None or enclosing[1] == "show"):
            continue  # visible already
        if enclosing is not None and enclosing[1] == "hide":  # folders in a tmpfs: traversable by anyone
            parts = os.path.relpath(path, enclosing[0]).split(os.sep)[:-1]
            for depth in range(1, len(parts) + 1):
                folder = os.path.join(enclosing[0], *parts[:depth])
                if folder not in made:
                    made.add(folder)
                    mounts += ["--perms", "0755", "--dir", folder]
        if kind == "show":
            mounts += ["--ro-bind", path, path]
        elif path == "/tmp":
            mounts += ["--perms", "1777", "--size", str(scratch_bytes), "--tmpfs", "/tmp"]
        else:
            mounts += ["--size", "1048576", "--tmpfs", path]
        done.append((path, kind))
    # the homes only hide: read-only once their mount points exist
    return mounts + [arg for path, kind in done if kind == "hide" and path != "/tmp" for arg in ("--remount-ro", path)]


def bwrap_command(scratch_bytes: int, identity: str, extra_paths=()) -> List[str]:
    """The bwrap prefix of a sandboxed command; /tmp (the child's home and working directory) is its only writable
    place, the home directories are empty but for the paths the child needs."""
    if identity == "private-uid":  # no user namespace: the child switches uid itself (with these two capabilities)
        namespaces = [
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--cap-add",
            "CAP_SETUID",
            "--cap-add",
            "CAP_SETGID",
        ]
    elif identity == "root-mapped":
        namespaces = ["--unshare-all", "--unshare-user", "--uid", str(NOBODY), "--gid", str(NOBODY)]
    else:
        namespaces = ["--unshare-all"]
    return [
        "bwrap",
        *namespaces,
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        *_mounts(scratch_bytes, extra_paths),
        "--chdir",
        "/tmp",
        "--",
    ]


def child_env(home: str, pythonpath: str = "") -> dict:
    """The whole environment a sandboxed child sees: nothing inherited (no API keys, no tokens)."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HOME": home,
        "TMPDIR": home,
    }
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def terminating_signal(returncode: Optional[int], backend: str) -> Optional[int]:
    """The signal that ended the child, if one did (bwrap reports a signalled child as exit code 128 + signal)."""
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    if backend == "bwrap" and returncode > 128:
        return returncode - 128
    return None


def wait_for_exit(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Whether the child exited within `timeout_s`; woken by the exit itself (a pidfd) where Linux has one, not by
    Popen.wait's polling, which adds up to 50 ms to every program. The child is left unreaped (kill_tree reaps
    it): while it is a zombie its pid, and so its process group, cannot be reused by anyone else."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux >= 5.3, or already reaped
        try:
            proc.wait(timeout_s)
            return True
        except subprocess.TimeoutExpired:
            return False
    try:
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    finally:
        os.close(pidfd)


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
