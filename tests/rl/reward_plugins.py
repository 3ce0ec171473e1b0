"""User reward functions for the tests: well-behaved, raising, hanging, crashing, memory-hungry."""

import os
import time


def length_bonus(record, completion):
    return min(len(completion), 10) / 10


def raises(record, completion):
    raise RuntimeError("reward function bug")


def hangs(record, completion):
    if "hang" in completion:
        while True:
            time.sleep(0.01)
    return 1.0


def crashes(record, completion):
    if "crash" in completion:
        os._exit(3)
    return 0.5


def eats_memory(record, completion):
    blob = bytearray(1 << 30)  # 1 GiB: over the sandbox's address-space limit
    return float(len(blob))


def returns_garbage(record, completion):
    return "not a number"


def parity(record, completion):
    """A reward with spread for an untrained model: whether the completion text has an even length."""
    return float(len(completion) % 2 == 0)


_calls = {"n": 0}


def hang_once(record, completion):
    """Hangs on its first call in each sandbox process (the sandbox is killed and restarted), then behaves."""
    _calls["n"] += 1
    if _calls["n"] == 1:
        while True:
            time.sleep(0.01)
    return 0.0


def even_answer(record, completion):
    """An easy-to-learn reward for sanity checks: the final 'Answer: N' is an even number."""
    from latentforge.data.synthetic import extract_answer

    from latentforge.rl.rewards.base import answer_section

    value = extract_answer(answer_section(record, completion))
    return float(value is not None and value % 2 == 0)


# ----- hostile reward functions: what the sandbox must contain (tests/rl/test_sandbox.py) -----------------------
def environment(record, completion):
    return dict(os.environ)


def kills_parent(record, completion):
    import signal

    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(0.5)
    return 1.0


def writes_file(record, completion):
    with open(record["path"], "w") as f:
        f.write("escaped")
    return 1.0


def connects(record, completion):
    import socket

    with socket.create_connection(("127.0.0.1", record["port"]), timeout=2):
        return 1.0


class _RunsCodeWhenUnpickled:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def returns_exploit(record, completion):
    return _RunsCodeWhenUnpickled(record["path"])


def returns_nan(record, completion):
    return float("nan")


def returns_inf_result(record, completion):
    from latentforge.rl.rewards.base import RewardResult

    return RewardResult(float("inf"), correct=True)


def returns_numpy(record, completion):
    import numpy as np

    return np.float32(0.25)


def forges_the_reply(record, completion):
    """Writes a pickle that would run a command in the caller straight into the reply pipe."""
    import struct

    payload = f"cos\nsystem\n(S'touch {record['path']}'\ntR.".encode()
    stdin_pipe = os.readlink("/proc/self/fd/0")
    for fd in map(int, os.listdir("/proc/self/fd")):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if fd > 2 and link.startswith("pipe:") and link != stdin_pipe:
            os.write(fd, struct.pack("!Q", len(payload)) + payload)
    time.sleep(5)
    return 0.0
