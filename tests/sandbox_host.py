"""The host side of the sandbox escape suite (tests/test_sandbox_escapes.py): resources an attempt must never
reach, and the checks that judge an attempt from outside the sandbox.

Modes (docs/SECURITY.md reports the counts per mode):
- "default": what `execute_code` picks on this host (bubblewrap where it works, as in CI);
- "process": the child's own kernel layers (netns, tmpfs, no capabilities, Landlock, seccomp) without bwrap;
- "python-only": no kernel layer at all (the test switch NANOCHAT_SANDBOX_TEST_PYTHON_ONLY), so the audit hook's
  and the guard's own strength is measured, as on a host without Landlock, namespaces or seccomp.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from nanochat.execution import ExecutionResult, execute_code

TIMEOUT = 1.5  # seconds each attempt may run; long enough for a slow start, short for the loop attempts
SLACK = 3.0  # two interpreter starts and the reaping, on a busy 2-core machine
MODES = ("default", "process", "python-only")
PYTHON_ONLY_SWITCH = "NANOCHAT_SANDBOX_TEST_PYTHON_ONLY"


@dataclass(frozen=True)
class Attempt:
    id: str
    code: str
    expect: str  # blocked (a `sandbox:` error), timeout, memory, error (any other clear error), ok
    words: tuple[str, ...] = ()  # the error must contain these
    helper_parent: bool = False  # run from a helper process whose own environment holds the secret


def attempt(id: str, code: str, expect: str = "blocked", *words: str, helper_parent: bool = False) -> Attempt:
    return Attempt(id, textwrap.dedent(code).strip() + "\n", expect, words, helper_parent)


@dataclass
class Host:
    outside: Path  # a directory outside the sandbox, holding the secret, the victim and a planted module
    secret_file: Path
    secret: str
    victim: Path
    tcp: socket.socket
    udp: socket.socket
    unix: socket.socket
    unix_path: str
    parent_environ: list[str]  # this process's environment entries, as /proc/<pid>/environ shows them
    signals: dict = None  # signal number -> how many this process received (SIGIO, SIGUSR2: counted, not fatal)

    def prelude(self, marker: str) -> str:
        names = {"OUTSIDE": str(self.outside), "SECRET_FILE": str(self.secret_file), "VICTIM": str(self.victim),
                 "MARKER": marker, "TARGET": f"{self.outside}/{marker}", "TCP_PORT": self.tcp.getsockname()[1],
                 "UDP_PORT": self.udp.getsockname()[1], "UNIX_SOCKET": self.unix_path,
                 # A command that leaves a trace outside and lingers: what a started process would do.
                 "SLEEPER": ["/bin/sh", "-c", f"touch {self.outside}/{marker}; sleep 30; : {marker}"]}  # fmt: skip
        return "".join(f"{name} = {value!r}\n" for name, value in names.items())

    def state(self) -> dict:
        """What no attempt may change."""
        return {
            "outside": sorted(os.listdir(self.outside)),
            "victim": (self.victim.read_bytes(), self.victim.stat().st_mtime_ns, self.victim.stat().st_mode),
            "priority": os.getpriority(os.PRIO_PROCESS, 0),
            "affinity": os.sched_getaffinity(0),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
            "signals received": dict(self.signals),
        }

    def close(self) -> None:
        for s in (self.tcp, self.udp, self.unix):
            s.close()
        for number in self.signals:
            signal.signal(number, signal.SIG_DFL)


def make_host(outside: Path) -> Host:
    secret = f"canary-{uuid.uuid4()}"
    (outside / "secret.txt").write_text(secret)
    (outside / "victim.txt").write_text("precious")
    (outside / "planted.py").write_text(f"print({secret!r})\n")
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    unix_path = str(outside / "host.sock")
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(unix_path)
    unix.listen(1)
    for s in (tcp, udp, unix):
        s.setblocking(False)
    environ = Path("/proc/self/environ").read_bytes().decode(errors="replace").split("\0")
    # A signal that reaches this process through I/O (F_SETOWN) is counted rather than fatal to the test run.
    signals = {signal.SIGIO: 0, signal.SIGUSR2: 0}
    for number in signals:
        signal.signal(number, lambda received, frame: signals.__setitem__(received, signals[received] + 1))
    return Host(outside, outside / "secret.txt", secret, outside / "victim.txt", tcp, udp, unix, unix_path,
                [e for e in environ if len(e) > 12], signals)  # fmt: skip


def received_anything(host: Host) -> list[str]:
    got = []
    for name, receive in (("tcp", host.tcp.accept), ("unix", host.unix.accept), ("udp", lambda: host.udp.recv(64))):
        try:
            receive()
            got.append(name)
        except BlockingIOError:
            pass
    return got


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass  # exited while we looked
    return found


def files_named(marker: str) -> list[str]:
    found = []
    for folder in ("/tmp", "/dev/shm", "/var/tmp"):
        try:
            found += [f"{folder}/{name}" for name in os.listdir(folder) if marker in name]
        except OSError:
            pass
    return found


def run_from_helper(code: str, timeout: float, extra_env: dict[str, str]) -> ExecutionResult:
    """execute_code called by a separate parent process, whose initial environment holds `extra_env`."""
    call = ("import json, sys; from nanochat.execution import execute_code; "
            "print(json.dumps(execute_code(sys.stdin.read(), timeout=float(sys.argv[1])).__dict__))")  # fmt: skip
    env = {**os.environ, **extra_env, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", call, str(timeout)], input=code, capture_output=True, text=True,
                          env=env, timeout=timeout + 30, check=True)  # fmt: skip
    return ExecutionResult(**json.loads(done.stdout))


def run_in_mode(code: str, mode: str, timeout: float = TIMEOUT, helper_env: dict | None = None) -> ExecutionResult:
    isolation = "process" if mode == "process" else None
    switched = mode == "python-only"
    if switched:
        os.environ[PYTHON_ONLY_SWITCH] = "1"
    try:
        if helper_env is not None:
            return run_from_helper(code, timeout, helper_env)
        return execute_code(code, timeout=timeout, isolation=isolation)
    finally:
        if switched:
            del os.environ[PYTHON_ONLY_SWITCH]


def run_attempt(host: Host, attempt: Attempt, mode: str, hidden: bool = False) -> ExecutionResult:
    """Run one attempt and judge it from the host. `hidden`: the sandbox cannot even see the host paths the attempt
    names (bubblewrap), so it must find nothing rather than be refused."""
    marker = f"escape-{uuid.uuid4().hex[:12]}"
    code = host.prelude(marker) + attempt.code
    env_secret = f"canary-env-{uuid.uuid4()}"
    before = host.state()
    start = time.monotonic()
    helper_env = {"AWS_SECRET_ACCESS_KEY": env_secret} if attempt.helper_parent else None
    result = run_in_mode(code, mode, helper_env=helper_env)
    elapsed = time.monotonic() - start
    time.sleep(0.05)  # anything that did escape gets a moment to show itself

    # Nothing reached the host.
    output = f"{result.stdout}\n{result.stderr}\n{result.error}"
    assert host.secret not in output and env_secret not in output, "a secret leaked into the output"
    assert not [e for e in host.parent_environ if e in output], "the parent's environment leaked into the output"
    assert received_anything(host) == [], "a host listener was reached"
    assert processes_with(marker) == [], "a process started by the program survived"
    assert files_named(marker) == [], "a file was created outside the sandbox"
    assert host.state() == before, "the host changed"

    # A clear result within the limit.
    assert elapsed < TIMEOUT + SLACK + (5.0 if attempt.helper_parent else 0.0), f"took {elapsed:.1f} s"
    if hidden:
        assert result.error is None or "No such file" in result.error or "No module named" in result.error, result
        return result
    assert result.error or attempt.expect == "ok", result
    if attempt.expect == "blocked":
        assert not result.success and result.error.startswith("sandbox:"), (result.error, result.stderr[-2000:])
    elif attempt.expect == "timeout":
        assert result.timeout and "timed out" in result.error and not result.success, result
    elif attempt.expect == "memory":
        assert result.memory_exceeded and not result.success, result
    elif attempt.expect == "error":
        assert not result.success and not result.error.startswith("sandbox:"), result
    else:
        assert attempt.expect == "ok" and result.success, result
    for word in attempt.words:
        assert word in result.error, (word, result.error)
    return result
