"""Escape attempts against the code sandbox (nanochat/execution.py), each judged from the host side.

Every attempt is a real program run by `execute_code`. It starts with a prelude naming host resources it should
never reach (a directory and a secret file outside the sandbox, a file it must not modify, listening TCP, UDP
and unix sockets), then tries to reach them. The test checks, from outside the sandbox:

- the result is the expected clear outcome (a `sandbox:` error naming the denied action, a timeout, a memory
  error, or a harmless success), within the time limit plus startup slack;
- no file appeared outside the sandbox (the attempt's unique marker is in every name it tries), the victim file
  is unchanged, no listener received anything, the secret and the parent's environment are nowhere in the
  output, no process carrying the marker is left, and this process's priority, CPU affinity and limits are
  unchanged.

The attempts themselves are listed by attack class in tests/escapes_files.py, tests/escapes_system.py and
tests/escapes_interpreter.py.

Docs: docs/SECURITY.md (threat model, what the sandbox does and does not stop).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from escapes_files import FILE_ATTEMPTS
from escapes_interpreter import INTERPRETER_ATTEMPTS
from escapes_system import SYSTEM_ATTEMPTS
from sandbox_host import TIMEOUT, make_host, run_attempt

from nanochat.execution import _bwrap_problem, execute_code

ATTEMPTS = FILE_ATTEMPTS + SYSTEM_ATTEMPTS + INTERPRETER_ATTEMPTS
ATTEMPT_IDS = [a.id for a in ATTEMPTS]
assert len(set(ATTEMPT_IDS)) == len(ATTEMPT_IDS)
# The Python layer on its own (no kernel layer): every attempt but the resource limits, which it does not decide.
PYTHON_ONLY = [a for a in ATTEMPTS if a.expect not in ("timeout", "memory")]
# The child's own kernel layers without bubblewrap: one or two of each kind (the default mode runs all of them).
PROCESS_IDS = ["open_write", "dir_fd_inside_climb", "read_secret", "parent_environ", "tcp_connect", "unix_connect",
               "subprocess_run", "ctypes_types_via_subclasses", "kill_parent", "memory_bomb", "infinite_loop",
               "huge_stdout", "fresh_posix_create_builtin", "frame_walk_globals", "alias_posixsubprocess_setsid",
               "alias_subinterpreter_os_system", "hook_frames_tampered", "memfd_bomb", "alias_ssl_read_without_audit",
               "report_pipe_flooded", "sandbox_module_globals", "read_secret_linecache", "import_planted_module",
               "fcntl_setown_signals_parent", "pipe_buffer_beyond_maximum"]
PROCESS = [a for a in ATTEMPTS if a.id in PROCESS_IDS]


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    host = make_host(tmp_path_factory.mktemp("host"))
    yield host
    host.close()


# Under bubblewrap the host's files are not refused but absent: these find nothing (no file, no module) instead.
HIDDEN_BY_BWRAP = {"chdir_then_write", "read_secret_linecache", "import_planted_module"}
BWRAP_IS_DEFAULT = _bwrap_problem() is None and not os.environ.get("NANOCHAT_SANDBOX")


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=ATTEMPT_IDS)
def test_escape_attempt(host, attempt):
    run_attempt(host, attempt, "default", hidden=BWRAP_IS_DEFAULT and attempt.id in HIDDEN_BY_BWRAP)


@pytest.mark.parametrize("attempt", PYTHON_ONLY, ids=[a.id for a in PYTHON_ONLY])
def test_escape_attempt_python_layer_only(host, attempt):
    run_attempt(host, attempt, "python-only")


@pytest.mark.parametrize("attempt", PROCESS, ids=[a.id for a in PROCESS])
def test_escape_attempt_kernel_layers_without_bwrap(host, attempt):
    run_attempt(host, attempt, "process")


def test_there_are_at_least_fifty_distinct_attempts():
    assert len(ATTEMPTS) >= 50
    assert len({a.code for a in ATTEMPTS}) == len(ATTEMPTS)


def test_huge_output_is_truncated_not_buffered():
    result = execute_code("import sys; sys.stdout.write('x' * 50_000_000)", timeout=TIMEOUT)
    assert result.success and len(result.stdout) < 1_100_000 and result.stdout.endswith("[output truncated]\n")


def test_unknown_isolation_is_an_error():
    with pytest.raises(ValueError, match="unknown sandbox isolation"):
        execute_code("print(1)", isolation="docker")


def test_bwrap_requested_but_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("NANOCHAT_SANDBOX", "bwrap")
    with pytest.raises(RuntimeError, match="apt-get install bubblewrap"):
        execute_code("print(1)")


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="no bwrap: run scripts/system-deps.sh")
def test_bwrap_hides_the_host_filesystem(host):
    # Under bwrap the host's files are not merely refused: they do not exist. Listing / is refused by the audit
    # hook, so ask the kernel indirectly: os.path.exists makes no audited call.
    code = f"import os; print(os.path.exists({str(host.secret_file)!r}), os.path.exists('/usr/lib'), os.getpid())"
    result = execute_code(code, timeout=TIMEOUT, isolation="bwrap")
    exists, usr, pid = result.stdout.split()
    assert result.success and (exists, usr) == ("False", "True")
    assert int(pid) < 10  # its own pid namespace


# --- the kernel layers on their own ------------------------------------------------------------------------------

KERNEL_PROBE = """
import json, os, socket, stat, sys
from nanochat.sandbox_child import _isolate_kernel

action, secret, target, port, unix_path = sys.argv[1:]
layers = _isolate_kernel(0, os.path.realpath(os.getcwd()))
print(json.dumps(layers), flush=True)
actions = {
    "read_secret": lambda: open(secret).read(),
    "write_outside": lambda: open(target, "w"),
    "write_inside": lambda: open("inside.txt", "w").write("x"),
    "read_stdlib": lambda: open(os.__file__).read(1),
    "tcp_connect": lambda: socket.create_connection(("127.0.0.1", int(port)), timeout=1),
    "unix_connect": lambda: socket.socket(socket.AF_UNIX).connect(unix_path),
    "mknod": lambda: os.mknod("disk", stat.S_IFBLK | 0o600, os.makedev(8, 0)),
    "fork": lambda: os.fork() or os._exit(0),
    "setsid": os.setsid,
    "memfd_create": lambda: os.memfd_create("x"),
    "signal_parent": lambda: os.kill(os.getppid(), 0),
    "prlimit_parent": lambda: __import__("resource").prlimit(os.getppid(), 7, (3, 3)),
    "setown_parent": lambda: __import__("fcntl").fcntl(os.pipe()[0], 8, os.getppid()),
    "pipe_buffer_64m": lambda: __import__("fcntl").fcntl(os.pipe()[1], 1031, 64 << 20),
}
try:
    actions[action]()
    print("allowed")
except OSError:
    print("denied")
"""
ALWAYS_ALLOWED = {"write_inside", "read_stdlib"}
DENIED_BY_LANDLOCK = {"read_secret", "write_outside"}
KILLED_BY_SECCOMP = {"tcp_connect", "unix_connect", "fork", "setsid", "memfd_create", "signal_parent",
                     "prlimit_parent", "setown_parent", "pipe_buffer_64m"}  # fmt: skip
KERNEL_ACTIONS = sorted(ALWAYS_ALLOWED | DENIED_BY_LANDLOCK | KILLED_BY_SECCOMP | {"mknod"})


@pytest.mark.parametrize("action", KERNEL_ACTIONS)
def test_kernel_layers_hold_without_the_audit_hook(host, tmp_path, action):
    """The kernel layers of stage 1 stop what they cover even with no Python-level check at all (as after an
    interpreter exploit): Landlock refuses files, seccomp kills the process at a forbidden system call (new
    processes and sessions, any socket, memfd_create, signals or limits aimed at another process). Which layers
    exist depends on the kernel and on privileges, so each is checked where it took effect; as root (CI),
    capabilities are always dropped."""
    target = host.outside / f"kernel-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    (tmp_path / "program.py").write_text("")  # what stage 1 finds in a real temp dir
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        done = subprocess.run([sys.executable, "-c", KERNEL_PROBE, action, str(host.secret_file), str(target),
                               str(listener.getsockname()[1]), host.unix_path], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        try:
            listener.accept()
            reached = True
        except BlockingIOError:
            reached = False
    layers, *outcome = done.stdout.split("\n")[:2]
    layers, outcome = json.loads(layers), (outcome[0] if done.returncode == 0 else f"signal {-done.returncode}")
    created = target.exists()
    if created:
        target.unlink()
    assert not reached and received_nothing_on_unix(host), (layers, outcome)
    if action in ALWAYS_ALLOWED:
        assert outcome == "allowed", (layers, outcome, done.stderr)
    if action in DENIED_BY_LANDLOCK and "landlock" in layers:
        assert outcome == "denied" and not created, (layers, outcome)
    if action in KILLED_BY_SECCOMP and "seccomp" in layers:
        assert done.returncode == -signal.SIGSYS, (layers, outcome, done.stderr[-500:])
    if action == "mknod" and ("landlock" in layers or os.geteuid() == 0):
        assert outcome == "denied", (layers, outcome)
    if os.geteuid() == 0:
        assert "no-capabilities" in layers, layers
    if sys.platform.startswith("linux") and Path("/usr/lib").exists() and has_libseccomp():
        assert "seccomp" in layers, layers  # libseccomp is there: the filter must load


def received_nothing_on_unix(host) -> bool:
    try:
        host.unix.accept()
        return False
    except BlockingIOError:
        return True


def has_libseccomp() -> bool:
    import ctypes.util

    return ctypes.util.find_library("seccomp") is not None


@pytest.mark.parametrize("isolation", ["process", "bwrap"])
def test_many_files_cannot_fill_the_disk(isolation):
    """RLIMIT_FSIZE caps each file; a tmpfs of its own caps the temp dir as a whole. Root (CI) always gets it;
    other users where they may create user namespaces."""
    if isolation == "bwrap" and shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (scripts/system-deps.sh installs it)")
    probe = execute_code("import os; s = os.statvfs('.'); print(s.f_blocks * s.f_frsize)", isolation=isolation)
    if int(probe.stdout) != 64 * 1024 * 1024:
        assert os.geteuid() != 0 or isolation == "bwrap", "root must get a size-limited temp dir"
        pytest.skip("no size-limited temp dir here (no user namespaces)")
    start = time.monotonic()
    result = execute_code("for i in range(64):\n    open(f'f{i}', 'wb').write(b'x' * (15 * 1024 * 1024))\n",
                          timeout=10, isolation=isolation)  # fmt: skip
    assert not result.success and "No space left on device" in result.error, result
    assert time.monotonic() - start < 5
