"""Running what we do not trust: generated programs, and user reward functions, in child processes with a wall-time
limit, an address-space limit and a cap on written bytes. A hung, crashing or memory-hungry child is killed and
reported; it never stalls or kills the caller.

- `run_untrusted_code(code, ...)`: one fresh `python -I` process per program (generated code), in an empty temporary
  directory with a minimal environment; stdout / stderr go to files capped by RLIMIT_FSIZE.
- `IsolatedFunction(target, ...)`: a long-lived child that imports a user reward function once (`"pkg.mod:fn"`)
  and serves calls over a pipe; on a timeout or a crash it is killed and restarted for the next call.

Limits are POSIX rlimits (Linux, macOS): RLIMIT_AS (memory), RLIMIT_CPU (a backstop to the wall clock),
RLIMIT_FSIZE (output), RLIMIT_CORE 0. They bound resources, they are not a security boundary against a
determined attacker (no namespaces, no seccomp): run the reward workers in a container for hostile inputs.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

OUTPUT_LIMIT_BYTES = 1 << 20
_HEADER = struct.Struct("!Q")


@dataclass
class ProgramResult:
    status: str  # ok | error (non-zero exit) | timeout | memory | crash (killed by a signal) | output_limit
    stdout: str
    stderr: str
    returncode: Optional[int]
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _limits(memory_mb: int, cpu_s: float, output_bytes: int):
    """The preexec hook of a sandboxed child: own session (so the whole tree can be killed), rlimits."""

    def apply():
        import resource

        os.setsid()
        memory = int(memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        cpu = max(1, int(cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (output_bytes, output_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child leads its own session: its children die too
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _classify(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return "ok"
    if returncode < 0:
        if -returncode == signal.SIGXFSZ:
            return "output_limit"
        if -returncode in (signal.SIGXCPU, signal.SIGKILL):
            return "timeout"
        return "crash"
    if "MemoryError" in stderr:
        return "memory"
    if "File too large" in stderr:  # Python ignores SIGXFSZ: the capped write fails with EFBIG instead
        return "output_limit"
    return "error"


def run_untrusted_code(code: str, *, stdin: str = "", timeout_s: float = 5.0, memory_mb: int = 256,
                       output_bytes: int = OUTPUT_LIMIT_BYTES) -> ProgramResult:
    """Run `code` with a fresh isolated Python interpreter; never raises for anything the program does."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lf_sandbox_") as workdir:
        out_path, err_path = os.path.join(workdir, "stdout"), os.path.join(workdir, "stderr")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": workdir}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            try:
                proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", code], stdin=subprocess.PIPE,
                                        stdout=out, stderr=err, cwd=workdir, env=env,
                                        preexec_fn=_limits(memory_mb, timeout_s, output_bytes))
            except (OSError, ValueError) as exc:  # e.g. a NUL byte in the code
                return ProgramResult("error", "", f"could not start: {exc}", None, time.perf_counter() - start)
            timed_out = False
            try:
                proc.communicate(stdin.encode("utf-8", "replace"), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_tree(proc)
        stdout = _read_capped(out_path, output_bytes)
        stderr = _read_capped(err_path, output_bytes)
    status = "timeout" if timed_out else _classify(proc.returncode, stderr)
    return ProgramResult(status, stdout, stderr, proc.returncode, time.perf_counter() - start)


def _read_capped(path: str, limit: int) -> str:
    with open(path, "rb") as f:
        return f.read(limit).decode("utf-8", "replace")


# ----- a user reward function in a long-lived child --------------------------------------------------------------
def _send(fd: int, obj: Any) -> None:
    payload = pickle.dumps(obj)
    data = _HEADER.pack(len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def _recv_exact(fd: int, n: int, deadline: Optional[float]) -> Optional[bytes]:
    chunks, remaining = [], n
    while remaining:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, remaining)
        if not chunk:
            return None  # EOF: the other side is gone
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def _recv(fd: int, deadline: Optional[float] = None):
    header = _recv_exact(fd, _HEADER.size, deadline)
    if header is None:
        raise EOFError
    payload = _recv_exact(fd, _HEADER.unpack(header)[0], deadline)
    if payload is None:
        raise EOFError
    return pickle.loads(payload)


class IsolatedFunction:
    """Calls `target` ("pkg.module:function") in a child process: `call(*args)` -> (status, value_or_message).

    status is "ok" (value), "error" (the function raised: the traceback text), "timeout" or "crash" (the child
    was killed or died: the reason). The child is started on first use and after every timeout or crash.
    """

    def __init__(self, target: str, *, timeout_s: float = 5.0, memory_mb: int = 2048):
        if ":" not in target:
            raise ValueError(f"reward function target must look like 'package.module:function', got {target!r}")
        self.target = target
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._proc: Optional[subprocess.Popen] = None
        self.restarts = 0

    def start(self) -> "IsolatedFunction":
        """Start the child now (a target that cannot be imported fails here, at start-up, not mid-run)."""
        if self._proc is None:
            self._start()
        return self

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
        self._proc = subprocess.Popen(
            [sys.executable, "-P", os.path.abspath(__file__), self.target], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
            preexec_fn=_limits(self.memory_mb, 1 << 20, OUTPUT_LIMIT_BYTES * 64))
        # the child answers "ready" (or the import error) before serving calls; importing may take a while
        status, message = self._receive(time.monotonic() + max(30.0, self.timeout_s))
        if status != "ready":
            self.close()
            raise RuntimeError(f"reward function {self.target} could not be loaded in its sandbox: {message}")

    def _receive(self, deadline: float):
        try:
            return _recv(self._proc.stdout.fileno(), deadline)
        except TimeoutError:
            self.close()
            return "timeout", f"no answer within {self.timeout_s:g} s; the sandbox was killed"
        except (EOFError, pickle.UnpicklingError, OSError):
            code = self._proc.wait() if self._proc else None
            self.close()
            return "crash", f"the sandbox died (exit code {code})"

    def call(self, *args):
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._start()
        try:
            _send(self._proc.stdin.fileno(), args)
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
                _kill_tree(self._proc)
            for stream in (self._proc.stdin, self._proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self._proc = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def load_target(target: str):
    """"pkg.module:attr" -> the object."""
    import importlib

    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


def _serve(target: str) -> None:
    """The child's loop: protocol on the original stdout; the function's own prints go to stderr (discarded)."""
    import traceback

    out_fd = os.dup(1)
    os.dup2(2, 1)
    in_fd = 0
    try:
        fn = load_target(target)
    except BaseException:  # noqa: BLE001 - reported to the parent
        _send(out_fd, ("import_error", traceback.format_exc(limit=5)))
        return
    _send(out_fd, ("ready", None))
    while True:
        try:
            args = _recv(in_fd)
        except EOFError:
            return
        try:
            reply = ("ok", fn(*args))
            pickle.dumps(reply)
        except BaseException:  # noqa: BLE001 - a raising reward function is reported, the child lives on
            reply = ("error", traceback.format_exc(limit=5))
        _send(out_fd, reply)


if __name__ == "__main__":
    # started as a script with `python -P`: the script's own folder is not on sys.path, so its module names cannot
    # shadow the user's
    _serve(sys.argv[1])
