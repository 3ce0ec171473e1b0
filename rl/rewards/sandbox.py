"""Running what we do not trust: generated programs, and user reward functions, in sandboxed child processes.
A hung, crashing, memory-hungry, flooding or hostile child is killed and reported; it never stalls, kills or
reads secrets from the caller.

Public API (e.g. for tool-use environments):

- `run_untrusted_code(code, *, stdin="", timeout_s=5, memory_mb=256, output_bytes=1 MiB, max_processes=64,
  scratch_mb=64, backend="auto") -> ProgramResult(status, stdout, stderr, returncode, wall_s, backend)`:
  one fresh `python -I -S` per program. `status` is ok | error (non-zero exit) | timeout | memory | crash
  (killed by a signal) | output_limit. Never raises for anything the program does. The code travels as one
  argument: at most 128 KiB.
- `IsolatedFunction("pkg.module:function", timeout_s=5, memory_mb=2048, max_processes=64, backend="auto")`:
  `.start()`, then `.call(*args) -> (status, value_or_message)` with status ok | error (the function raised:
  its traceback) | timeout | crash (the child was killed or died: the reason); a long-lived `python -P` child
  imports the function once and is restarted after every timeout or crash. Arguments must pickle; replies may
  only hold plain Python values and RewardResult (a reply is never unpickled into arbitrary classes). `.close()`.
  Start it from a thread that lives as long as it does: bwrap's `--die-with-parent` follows the starting thread
  (`run_untrusted_code` from `asyncio.to_thread` is fine: the call ends with the program).

Containment (rl/rewards/confinement.py), backend "bwrap" (chosen by "auto" when `bwrap` works here):
no network (not even 127.0.0.1), the filesystem read-only except a fresh `scratch_mb` tmpfs at /tmp (HOME, cwd),
/root and $HOME empty but for the interpreter, LatentForge and the caller's import path (no credential files),
its own PID namespace (every descendant, `setsid` or not, dies when the program exits or is killed; its parent is
the namespace's init, which it cannot kill), RLIMIT_NPROC = max_processes, an environment of PATH, LANG, HOME,
TMPDIR (+ PYTHONPATH for reward functions) only, RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE / no core files; started
as root, the child switches to an unprivileged uid of its own before running anything untrusted. Backend
"rlimits" (no bwrap; a RuntimeWarning says what is not contained): the same rlimits and environment, the
program's process group killed when it ends, and untrusted code that kills its parent kills a shim, not the
caller.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from . import confinement
from .sandbox_child import load_target, loads_reply, recv_payload, send

OUTPUT_LIMIT_BYTES = 1 << 20
MAX_PROCESSES = 64
SCRATCH_MB = 64

__all__ = ["ProgramResult", "run_untrusted_code", "IsolatedFunction", "load_target"]


@dataclass
class ProgramResult:
    status: str  # ok | error (non-zero exit) | timeout | memory | crash (killed by a signal) | output_limit
    stdout: str
    stderr: str
    returncode: Optional[int]
    wall_s: float
    backend: str = "rlimits"

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _child_command(
    backend: str,
    mode: str,
    payload: str,
    python_flags: tuple,
    *,
    memory_mb: int,
    cpu_s: float,
    output_bytes: int,
    max_processes: int,
    scratch_mb: int,
    import_path=(),
) -> list:
    if backend == "rlimits":  # no RLIMIT_NPROC: outside a sandbox it would count all the user's processes
        return confinement.child_command(
            "self",
            python_flags,
            mode,
            payload,
            memory_mb=memory_mb,
            cpu_s=cpu_s,
            output_bytes=output_bytes,
            max_processes=0,
            shield=sys.platform.startswith("linux"),
        )
    identity = confinement.sandbox_identity()
    return confinement.bwrap_command(scratch_mb << 20, identity, import_path) + confinement.child_command(
        identity,
        python_flags,
        mode,
        payload,
        memory_mb=memory_mb,
        cpu_s=cpu_s,
        output_bytes=output_bytes,
        max_processes=max_processes,
        shield=False,
    )


def _classify(returncode: int, stderr: str, backend: str) -> str:
    import signal

    if returncode == 0:
        return "ok"
    sig = confinement.terminating_signal(returncode, backend)
    if sig is not None:
        if sig == signal.SIGXFSZ:
            return "output_limit"
        if sig in (signal.SIGXCPU, signal.SIGKILL):
            return "timeout"
        return "crash"
    if "MemoryError" in stderr:
        return "memory"
    if "File too large" in stderr:  # Python ignores SIGXFSZ: the capped write fails with EFBIG instead
        return "output_limit"
    return "error"


def run_untrusted_code(
    code: str,
    *,
    stdin: str = "",
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    output_bytes: int = OUTPUT_LIMIT_BYTES,
    max_processes: int = MAX_PROCESSES,
    scratch_mb: int = SCRATCH_MB,
    backend: str = "auto",
) -> ProgramResult:
    """Run `code` in a fresh sandboxed Python interpreter; never raises for anything the program does."""
    start = time.perf_counter()
    backend = confinement.resolve_backend(backend)
    with tempfile.TemporaryDirectory(prefix="lf_sandbox_") as workdir:
        paths = {name: os.path.join(workdir, name) for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "wb") as f:  # a file, not a pipe: a program that never reads it cannot block us
            f.write(stdin.encode("utf-8", "replace"))
        scratch = os.path.join(workdir, "scratch")  # the rlimits backend's working directory (bwrap: a tmpfs)
        os.mkdir(scratch)
        home = "/tmp" if backend == "bwrap" else scratch
        with open(paths["stdin"], "rb") as inp, open(paths["stdout"], "wb") as out, open(paths["stderr"], "wb") as err:
            try:
                proc = subprocess.Popen(
                    _child_command(
                        backend,
                        "program",
                        code,
                        ("-I", "-S"),
                        memory_mb=memory_mb,
                        cpu_s=timeout_s,
                        output_bytes=output_bytes,
                        max_processes=max_processes,
                        scratch_mb=scratch_mb,
                    ),
                    stdin=inp,
                    stdout=out,
                    stderr=err,
                    cwd=scratch,
                    env=confinement.child_env(home),
                    start_new_session=True,
                )  # its own session: the whole tree can be killed
            except (OSError, ValueError) as exc:  # e.g. a NUL byte in the code, code over 128 KiB
                return ProgramResult("error", "", f"could not start: {exc}", None, time.perf_counter() - start, backend)
            timed_out = not confinement.wait_for_exit(proc, timeout_s)
            confinement.kill_tree(proc)  # also after an exit: what is left in its session (rlimits backend) dies
        out_path, err_path = paths["stdout"], paths["stderr"]
        stdout = _read_capped(out_path, output_bytes)
        stderr = _read_capped(err_path, output_bytes)
    status = "timeout" if timed_out else _classify(proc.returncode, stderr, backend)
    return ProgramResult(status, stdout, stderr, proc.returncode, time.perf_counter() - start, backend)


def _read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "replace")


class IsolatedFunction:
    """Calls `target` ("pkg.module:function") in a sandboxed child: `call(*args)` -> (status, value_or_message).

    status is "ok" (value), "error" (the function raised: the traceback text), "timeout" or "crash" (the child
    was killed or died: the reason). The child is started on first use and after every timeout or crash.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 5.0,
        memory_mb: int = 2048,
        max_processes: int = MAX_PROCESSES,
        scratch_mb: int = SCRATCH_MB,
        backend: str = "auto",
    ):
        if ":" not in target:
            raise ValueError(f"reward function target must look like 'package.module:function', got {target!r}")
        self.target = target
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_processes = max_processes
        self.scratch_mb = scratch_mb
        self.backend = confinement.resolve_backend(backend)
        self._proc: Optional[subprocess.Popen] = None
        self._home: Optional[str] = None
        self.restarts = 0

    def start(self) -> "IsolatedFunction":
        """Start the child now (a target that cannot be imported fails here, at start-up, not mid-run)."""
        if self._proc is None:
            self._start()
        return self

    def _start(self) -> None:
        # the caller's import path ('' is its working directory), so the child imports what the caller would
        import_path = [p or os.getcwd() for p in sys.path] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
        pythonpath = os.pathsep.join(p for p in import_path if p)
        # bwrap: home is a fresh tmpfs at /tmp; rlimits: a temporary directory removed by close()
        self._home = "/tmp" if self.backend == "bwrap" else tempfile.mkdtemp(prefix="lf_sandbox_")
        self._proc = subprocess.Popen(
            _child_command(
                self.backend,
                "serve",
                self.target,
                ("-P",),
                memory_mb=self.memory_mb,
                cpu_s=1 << 20,
                output_bytes=OUTPUT_LIMIT_BYTES * 64,
                max_processes=self.max_processes,
                scratch_mb=self.scratch_mb,
                import_path=import_path,
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=confinement.child_env(self._home, pythonpath),
            cwd="/" if self.backend == "bwrap" else self._home,
            start_new_session=True,
        )
        # the child answers "ready" (or the import error) before serving calls; importing may take a while
        status, message = self._receive(time.monotonic() + max(30.0, self.timeout_s))
        if status != "ready":
            self.close()
            hint = (
                " (the sandbox runs as an unprivileged user: the module's files must be world-readable)"
                if self.backend == "bwrap" and confinement.sandbox_identity() == "private-uid"
                else ""
            )
            raise RuntimeError(f"reward function {self.target} could not be loaded in its sandbox{hint}: {message}")

    def _receive(self, deadline: float):
        try:
            assert self._proc is not None and self._proc.stdout is not None  # _start opens it with pipes
            reply = loads_reply(recv_payload(self._proc.stdout.fileno(), deadline))
            if not (isinstance(reply, tuple) and len(reply) == 2 and isinstance(reply[0], str)):
                raise ValueError(f"expected (status, value), got {type(reply).__name__}")
            return reply
        except TimeoutError:
            self.close()
            return "timeout", f"no answer within {self.timeout_s:g} s; the sandbox was killed"
        except Exception as exc:  # noqa: BLE001 - EOF, or bytes crafted to break the unpickler: never the caller's
            code = self._proc.poll() if self._proc else None
            self.close()
            detail = f"exit code {code}" if code is not None else f"unreadable reply: {exc}"
            return "crash", f"the sandbox died or misbehaved ({detail}); it is restarted for the next call"

    def call(self, *args):
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        assert self._proc is not None and self._proc.stdin is not None  # _start opens it with pipes
        try:
            send(self._proc.stdin.fileno(), args)
        except (BrokenPipeError, OSError):
            self.close()
            self.restarts += 1
            return "crash", "the sandbox was gone before the call"
        status, value = self._receive(time.monotonic() + self.timeout_s)
        if status in ("timeout", "crash"):
            self.restarts += 1
        return status, value

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                confinement.kill_tree(self._proc)
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
            self._proc = None
        if self._home is not None and self._home != "/tmp":
            shutil.rmtree(self._home, ignore_errors=True)
        self._home = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
