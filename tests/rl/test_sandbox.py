"""The sandbox contains hostile code: each test is one escape the old rlimits-only sandbox allowed (issue 15)."""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

from latentforge.rl.rewards import IsolatedFunction, run_untrusted_code
from latentforge.rl.rewards import confinement
from latentforge.rl.rewards.sandbox_child import loads_reply

PLUGINS = "tests.rl.reward_plugins"
BWRAP = confinement.bwrap_problem() is None
needs_bwrap = pytest.mark.skipif(not BWRAP, reason=f"bubblewrap not usable here: {confinement.bwrap_problem()}")
BACKENDS = ["rlimits", pytest.param("bwrap", marks=needs_bwrap)]


def _processes_with(marker: str, wait_s: float = 5.0):
    """pids on this machine whose command line holds `marker`, once the kernel has had `wait_s` to reap."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


@pytest.fixture
def marker():
    tag = f"lf-sandbox-test-{uuid.uuid4().hex}"
    yield tag
    for pid in _processes_with(tag, wait_s=0):  # survivors of a failing run must not outlive the test
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@needs_bwrap
def test_forked_children_die_when_the_program_exits(marker):
    code = (
        f"# {marker}\nimport os, time\n"
        "for _ in range(200):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "print('parent done')\n"
    )
    result = run_untrusted_code(code, timeout_s=20, max_processes=1000)
    assert result.status == "ok" and result.stdout.strip() == "parent done", result
    assert _processes_with(marker) == []


@needs_bwrap
def test_setsid_child_dies_when_the_program_is_killed(marker):
    code = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(60)  # {marker}'])\n"
        "time.sleep(0.5)\nwhile True: pass\n"
    )
    result = run_untrusted_code(code, timeout_s=2.0)
    assert result.status == "timeout"
    assert _processes_with(marker) == []


def _run_isolated(snippet: str) -> subprocess.CompletedProcess:
    """Runs `snippet` in a fresh interpreter: a sandbox that kills its caller must not take pytest with it."""
    return subprocess.run(
        [sys.executable, "-c", "import json\n" + snippet],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_reward_function_killing_its_parent_does_not_end_the_run(backend):
    proc = _run_isolated(
        "from latentforge.rl.rewards import IsolatedFunction\n"
        f"fn = IsolatedFunction('{PLUGINS}:kills_parent', timeout_s=10, backend='{backend}').start()\n"
        "first = fn.call({}, '')\n"
        f"second = IsolatedFunction('{PLUGINS}:length_bonus', backend='{backend}').start().call({{}}, 'abc')\n"
        "again = fn.call({}, '')\n"
        "print(json.dumps([first[0], second, again[0], fn.restarts]))\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second, again, restarts = json.loads(proc.stdout.strip().splitlines()[-1])
    if backend == "bwrap":  # its parent is the PID namespace's init: immune (as nobody, the kill is refused: error)
        assert first in ("ok", "error") and again == first and restarts == 0
    else:  # the signal kills the shim: the call is a recorded crash and the next call gets a fresh sandbox
        assert first == again == "crash" and restarts == 2
    assert second == ["ok", pytest.approx(0.3)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_program_killing_its_parent_does_not_end_the_run(backend):
    proc = _run_isolated(
        "from latentforge.rl.rewards import run_untrusted_code\n"
        "r = run_untrusted_code('import os, signal, time; os.kill(os.getppid(), signal.SIGKILL); time.sleep(1); "
        f"print(7)', backend='{backend}')\n"
        "print(json.dumps([r.status, r.stdout.strip()]))\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    status, stdout = json.loads(proc.stdout.strip().splitlines()[-1])
    if backend == "bwrap":  # its parent is the PID namespace's init: immune (as nobody, the kill is refused)
        assert (status, stdout) in (("ok", "7"), ("error", ""))
    else:  # the signal kills the shim: the program dies with it, reported (SIGKILL reads as a timeout)
        assert status in ("crash", "timeout") and stdout == ""


@pytest.mark.parametrize("backend", BACKENDS)
def test_secrets_in_the_environment_are_not_inherited(backend, monkeypatch):
    monkeypatch.setenv("LATENTFORGE_TEST_SECRET", "x")
    fn = IsolatedFunction(f"{PLUGINS}:environment", backend=backend).start()
    status, env = fn.call({}, "")
    fn.close()
    assert status == "ok" and "LATENTFORGE_TEST_SECRET" not in env
    assert set(env) <= {
        "PATH",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "PYTHONIOENCODING",
        "PYTHONDONTWRITEBYTECODE",
        "HOME",
        "TMPDIR",
        "PYTHONPATH",
        "PWD",
    }
    program = run_untrusted_code("import os; print(sorted(os.environ))", backend=backend)
    assert program.ok and "LATENTFORGE_TEST_SECRET" not in program.stdout


@pytest.fixture
def host_dir():
    """A writable directory outside /tmp (inside the sandbox, /tmp is its own fresh tmpfs)."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="lf-sandbox-test-", dir="/var/tmp")
    os.chmod(path, 0o777)  # writable by whoever runs the sandbox: only the read-only mount stops the write
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_bwrap
def test_no_writes_outside_the_scratch_directory(host_dir):
    target = os.path.join(host_dir, "escaped.txt")
    result = run_untrusted_code(
        f"import os\nopen(os.path.join(os.environ['HOME'], 'scratch.txt'), 'w').write('ok')\n"
        f"open({str(target)!r}, 'w').write('escaped')\n"
    )
    assert result.status == "error" and "Read-only file system" in result.stderr, result
    fn = IsolatedFunction(f"{PLUGINS}:writes_file", backend="bwrap").start()
    status, message = fn.call({"path": str(target)}, "")
    fn.close()
    assert status == "error" and "Read-only file system" in message
    assert not os.path.exists(target)


@needs_bwrap
def test_no_network_even_to_loopback():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        result = run_untrusted_code(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
        )
        fn = IsolatedFunction(f"{PLUGINS}:connects", backend="bwrap").start()
        status, message = fn.call({"port": port}, "")
        fn.close()
        with pytest.raises(socket.timeout):
            server.accept()
    assert result.status == "error" and "connected" not in result.stdout
    assert "ConnectionRefusedError" in result.stderr or "unreachable" in result.stderr, result.stderr
    assert status == "error"


@pytest.mark.skipif(
    not confinement.enforces_process_limit(),
    reason="RLIMIT_NPROC is not enforced here (no bwrap, or root and no unprivileged user can run this Python)",
)
def test_process_count_is_limited():
    code = (
        "import os, time\nn = 0\ntry:\n    for _ in range(100):\n        if os.fork() == 0:\n"
        "            time.sleep(5)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\nprint(n)\n"
    )
    result = run_untrusted_code(code, max_processes=16, timeout_s=10)
    assert result.ok and int(result.stdout) < 16


def test_without_bwrap_the_fallback_warns_what_is_not_contained(monkeypatch):
    monkeypatch.setattr(confinement, "bwrap_problem", lambda: "no `bwrap` on PATH")
    with pytest.warns(RuntimeWarning, match="no `bwrap` on PATH.*NOT contained: network access"):
        result = run_untrusted_code("print(1)")
    assert result.ok and result.backend == "rlimits"
    with pytest.raises(RuntimeError, match="bubblewrap is not usable: no `bwrap` on PATH"):
        run_untrusted_code("print(1)", backend="bwrap")


def test_replies_cannot_run_code_in_the_caller(tmp_path):
    target = tmp_path / "pwned"
    fn = IsolatedFunction(f"{PLUGINS}:returns_exploit").start()
    status, message = fn.call({"path": str(target)}, "")
    fn.close()
    assert status == "error" and "cannot cross the sandbox boundary" in message

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    forged = IsolatedFunction(f"{PLUGINS}:forges_the_reply").start()  # what a hostile child writes to the pipe
    status, message = forged.call({"path": str(target)}, "")
    forged.close()
    assert status == "crash" and "cannot cross the sandbox boundary" in message
    with pytest.raises(pickle.UnpicklingError, match="cannot cross the sandbox boundary"):
        loads_reply(pickle.dumps(("ok", Exploit())))
    assert not target.exists()
    assert loads_reply(pickle.dumps(("ok", {"a": [1.5, True, None, "x"]}))) == ("ok", {"a": [1.5, True, None, "x"]})


@needs_bwrap
def test_credentials_in_the_home_directory_are_hidden(host_dir, monkeypatch):
    """The home is an empty tmpfs but for what the child needs (here: a reward module on the import path)."""
    home = os.path.join(host_dir, "home")
    code_dir = os.path.join(home, "project")
    os.makedirs(code_dir)
    with open(os.path.join(home, ".netrc"), "w") as f:
        f.write("machine api.wandb.ai password secret-key\n")
    with open(os.path.join(code_dir, "lf_home_plugin.py"), "w") as f:
        f.write(
            "import os\n\ndef peek(record, completion):\n"
            "    return sorted(os.listdir(os.path.dirname(os.path.dirname(__file__))))\n"
        )
    for path in (home, code_dir, os.path.join(home, ".netrc"), os.path.join(code_dir, "lf_home_plugin.py")):
        os.chmod(path, 0o755)  # readable by anyone: only hiding keeps the sandbox out
    monkeypatch.setenv("HOME", home)
    monkeypatch.syspath_prepend(code_dir)
    program = run_untrusted_code(f"print(open({os.path.join(home, '.netrc')!r}).read())")
    assert program.status == "error" and "secret-key" not in program.stdout
    assert "No such file or directory" in program.stderr
    fn = IsolatedFunction("lf_home_plugin:peek", backend="bwrap").start()
    status, listing = fn.call({}, "")
    fn.close()
    assert (status, listing) == ("ok", ["project"])  # the module's folder is shown, the .netrc next to it is not
