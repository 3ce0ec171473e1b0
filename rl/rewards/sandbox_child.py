"""The sandboxed side of rl/rewards/sandbox.py, run as a script (`python -I -S` for programs, `python -P` for reward
functions, so the script's own folder never shadows the user's modules), plus the message framing both sides use.
Standard library only: it starts in every sandbox.

    sandbox_child.py program|serve <memory_bytes> <cpu_s> <output_bytes> <max_processes> <shield> <drop_to_uid>
        <code | package.module:function>

drop_to_uid >= 0 (bwrap started as root) switches to that user and group first, which also drops every
capability; then RLIMIT_AS / RLIMIT_CPU / RLIMIT_FSIZE / no core files, and with max_processes > 0 RLIMIT_NPROC
(per user: the sandbox's own uid, or the user namespace's);
shield = 1 (rlimits backend) runs the work in a grandchild that dies with this process, so untrusted code that
kills its parent (`os.kill(os.getppid(), SIGKILL)`) kills this shim, never the caller.
"""

from __future__ import annotations

import os
import sys

# pickle / struct / io are imported where used: a program's start-up (python -I -S, once per program) never
# needs them
HEADER_FORMAT = "!Q"
HEADER_SIZE = 8
MAX_MESSAGE_BYTES = 64 << 20
_REPLY_CLASSES = {("latentforge.rl.rewards.base", "RewardResult")}
_PR_SET_PDEATHSIG = 1


def loads_reply(payload: bytes):
    """Replies come from untrusted code: only plain values (numbers, strings, lists, dicts...) and RewardResult are
    rebuilt; a pickle naming any other class could run code in the caller."""
    import io
    import pickle

    class ReplyUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in _REPLY_CLASSES and module in sys.modules:
                return getattr(sys.modules[module], name)
            raise pickle.UnpicklingError(
                f"a reply holding a {module}.{name} cannot cross the sandbox boundary: "
                "return plain Python values (float, bool, str, list, dict) or a "
                "RewardResult"
            )

    return ReplyUnpickler(io.BytesIO(payload)).load()


def send(fd: int, obj) -> None:
    import pickle
    import struct

    payload = pickle.dumps(obj)
    data = struct.pack(HEADER_FORMAT, len(payload)) + payload
    while data:
        data = data[os.write(fd, data) :]


def recv_exact(fd: int, n: int, deadline=None):
    """n bytes from fd, None at EOF; TimeoutError past `deadline` (time.monotonic())."""
    import select
    import time

    chunks, remaining = [], n
    while remaining:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(remaining, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def recv_payload(fd: int, deadline=None) -> bytes:
    import pickle
    import struct

    header = recv_exact(fd, HEADER_SIZE, deadline)
    if header is None:
        raise EOFError
    size = struct.unpack(HEADER_FORMAT, header)[0]
    if size > MAX_MESSAGE_BYTES:
        raise pickle.UnpicklingError(f"a {size}-byte message is over the {MAX_MESSAGE_BYTES}-byte limit")
    payload = recv_exact(fd, size, deadline)
    if payload is None:
        raise EOFError
    return payload


def set_limits(memory_bytes: int, cpu_s: int, output_bytes: int, max_processes: int) -> None:
    """rlimits, set here rather than in the caller's fork (a preexec hook would cost every spawn a full fork of
    the caller); nothing untrusted has run yet."""
    import resource

    limits = {resource.RLIMIT_AS: memory_bytes, resource.RLIMIT_FSIZE: output_bytes, resource.RLIMIT_CORE: 0}
    if max_processes > 0:
        limits[resource.RLIMIT_NPROC] = max_processes
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))


def shield_caller(die_with_shim: bool) -> None:
    """Fork: this process becomes a shim that waits and passes the work's exit status on; the work returns from
    this call. die_with_shim: the work gets SIGKILL when the shim dies (a reward function's caller then sees EOF at
    once); programs skip it (ctypes costs their start-up more than the rest) and the caller kills their process
    group after the shim ends."""
    import signal

    shim = os.getpid()
    pid = os.fork()
    if pid == 0:
        if die_with_shim:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != shim:  # the shim died before prctl took effect
                os._exit(1)
        return
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGXCPU):
        signal.signal(sig, signal.SIG_IGN)
    status = os.waitpid(pid, 0)[1]
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(shim, sig)
    os._exit(os.waitstatus_to_exitcode(status))


def run_program(code: str) -> None:
    import builtins

    sys.argv = ["-c"]
    exec(compile(code, "<program>", "exec"), {"__name__": "__main__", "__builtins__": builtins})


def load_target(target: str):
    """ "pkg.module:attr" -> the object."""
    import importlib

    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{target} is not callable")
    return obj


def _plain(value):
    """A numpy / torch scalar -> its Python number (only plain values cross the boundary)."""
    if type(value).__module__.split(".")[0] in ("numpy", "torch") and hasattr(value, "item"):
        try:
            return value.item()
        except (TypeError, ValueError, RuntimeError):
            return value
    return value


def serve(target: str) -> None:
    """Protocol on the original stdout; the function's own prints go to stderr (discarded by the caller)."""
    import pickle
    import traceback

    out_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        fn = load_target(target)
    except BaseException:  # noqa: BLE001 - reported to the caller
        send(out_fd, ("import_error", traceback.format_exc(limit=5)))
        return
    send(out_fd, ("ready", None))
    while True:
        try:
            args = pickle.loads(recv_payload(0))  # from the caller: trusted
        except EOFError:
            return
        try:
            reply = ("ok", _plain(fn(*args)))
            loads_reply(pickle.dumps(reply))
        except BaseException:  # noqa: BLE001 - a raising reward function is reported, the child lives on
            reply = ("error", traceback.format_exc(limit=5))
        send(out_fd, reply)


def drop_privileges(uid: int) -> None:
    if uid >= 0:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)


def main(argv) -> None:
    mode, memory_bytes, cpu_s, output_bytes, max_processes, shield, drop_to, payload = argv
    drop_privileges(int(drop_to))
    set_limits(int(memory_bytes), int(cpu_s), int(output_bytes), int(max_processes))
    if shield == "1":
        shield_caller(die_with_shim=mode == "serve")
    if mode == "program":
        run_program(payload)
    else:
        serve(payload)


if __name__ == "__main__":
    main(sys.argv[1:])
