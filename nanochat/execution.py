"""Sandboxed execution of model-written Python (used by HumanEval-style scoring): the parent side.

`execute_code(code)` runs the program in a fresh interpreter (`python -I -S -B nanochat/sandbox_child.py`), never
by forking the caller: the caller may be a worker thread of a Gradio/Dagster process with torch loaded, where
forking is unsafe and SIGALRM is unavailable. The child gets its own session, so the parent can enforce the
wall-clock limit by killing the whole process group. What the child does (kernel layers, audit hook, guard) is
described in `nanochat/sandbox_child.py`; what it stops, and what a host without a layer loses, in
docs/SECURITY.md.

Isolation, strongest first (the default is the strongest this host has; one log line at the first run says
which layers took effect and which are missing):
- "bwrap": both child stages also run inside bubblewrap: a mount namespace in which only the interpreter, /usr
  and the temp dir exist (the rest of the host filesystem, /proc and the host's unix sockets are simply absent),
  new pid/ipc/uts/network namespaces, no capabilities, killed with the parent. The default where bwrap works.
- "process": the child's own kernel layers (network namespace, private tmpfs, no capabilities, Landlock,
  seccomp), each where the kernel and the user's privileges allow it, and the Python layer.

This is not a security boundary against a program written to attack it: a CPython memory-safety bug (one of the
known interpreter crashers) runs native code that no Python-level check sees; only the kernel layers are left
then. Nor is the verdict tamper-proof: a program can fake passing its tests (an object whose `__eq__` is always
True, a fake verdict on the report pipe, the json module replaced).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

from nanochat import sandbox_child as child

log = logging.getLogger(__name__)

_MAX_OUTPUT_BYTES = 1 << 20  # per stream: a print loop must not exhaust the parent's memory
_MAX_REPORT_LINE = 4096  # a report line longer than this is not the sandbox's: kept only as far as this
_STARTUP_LIMIT_S = 10.0  # time the child may take to start; the program's own clock starts after that
_MAX_TIMEOUT_S = 24 * 3600.0
_MIN_MEMORY_BYTES = 32 * 1024 * 1024  # the interpreter itself needs about 20 MiB to start
_MAX_MEMORY_BYTES = 1 << 50  # far above any machine, far below what setrlimit's rlim_t can hold
_ISOLATIONS = ("process", "bwrap")
# Tests only: measure the Python layer on its own, as on a host without any kernel layer. Honoured only inside
# pytest, so that no deployment can switch the kernel layers off by its environment.
_PYTHON_ONLY_SWITCH = "NANOCHAT_SANDBOX_TEST_PYTHON_ONLY"


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False


def execute_code(
    code: str,
    timeout: float = 5.0,
    maximum_memory_bytes: int | None = 256 * 1024 * 1024,
    *,
    isolation: str | None = None,
) -> ExecutionResult:
    """Run `code` in a sandboxed child interpreter; `maximum_memory_bytes=None` means no memory limit.

    `isolation`: "bwrap" or "process" (see the module docstring); None reads NANOCHAT_SANDBOX, and without it
    takes bwrap where it works here. Asking for bwrap where it does not work is an error, never a downgrade.
    """
    timeout, memory_bytes = _check_limits(timeout, maximum_memory_bytes)
    isolation = _choose_isolation(isolation)
    python_only = bool(os.environ.get(_PYTHON_ONLY_SWITCH)) and "PYTEST_CURRENT_TEST" in os.environ
    return _execute(code, timeout, memory_bytes, "process" if python_only else isolation, python_only)


def _execute(code: str, timeout: float, memory_bytes: int, isolation: str, python_only: bool) -> ExecutionResult:
    """execute_code after its checks; `python_only` (tests and nanochat.sandbox_bench) skips the kernel layers."""
    import shutil
    import tempfile

    sandbox_dir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat-sandbox-"))
    try:
        program_path = os.path.join(sandbox_dir, child.PROGRAM_FILE)
        with open(program_path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        return _run_child(sandbox_dir, timeout, memory_bytes, isolation, python_only)
    finally:
        # Entries are always removable by their owner: the program cannot chmod or chown (see the child's tables).
        shutil.rmtree(sandbox_dir, ignore_errors=True)


def _check_limits(timeout, maximum_memory_bytes) -> tuple[float, int]:
    """Validated (timeout, memory limit in bytes, 0 for none); a ValueError names the bad argument.

    Both are turned into plain int/float first, through the base type's own conversion: the child receives
    them as text, and an int subclass whose __str__ says "0" must not switch the memory limit off."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise ValueError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    timeout = float(int.__int__(timeout)) if isinstance(timeout, int) else float.__float__(timeout)
    if not math.isfinite(timeout) or not 0 < timeout <= _MAX_TIMEOUT_S:
        raise ValueError(f"timeout must be a finite number of seconds in (0, {_MAX_TIMEOUT_S:g}], got {timeout!r}")
    if maximum_memory_bytes is None:
        return timeout, 0
    if isinstance(maximum_memory_bytes, bool) or not isinstance(maximum_memory_bytes, int):
        raise ValueError(f"maximum_memory_bytes must be an int or None (no limit), "
                         f"got {type(maximum_memory_bytes).__name__}")  # fmt: skip
    memory = int.__int__(maximum_memory_bytes)
    if not _MIN_MEMORY_BYTES <= memory <= _MAX_MEMORY_BYTES:
        raise ValueError(f"maximum_memory_bytes must be in [{_MIN_MEMORY_BYTES}, {_MAX_MEMORY_BYTES}] (32 MiB, the "
                         f"interpreter needs about 20 MiB; 1 PiB), or None for no limit; got {memory}")  # fmt: skip
    return timeout, memory


def _choose_isolation(isolation: str | None) -> str:
    requested = isolation or os.environ.get("NANOCHAT_SANDBOX")
    if requested is None:
        return "bwrap" if _bwrap_problem() is None else "process"
    if requested not in _ISOLATIONS:
        raise ValueError(f"unknown sandbox isolation {requested!r} (NANOCHAT_SANDBOX): expected one of {_ISOLATIONS}")
    if requested == "bwrap" and (problem := _bwrap_problem()) is not None:
        raise RuntimeError(f"sandbox isolation 'bwrap' does not work here: {problem}")
    return requested


_bwrap_checked: dict[str, str | None] = {}  # bwrap's path -> None where it works, else why not


def _bwrap_problem() -> str | None:
    """None where bubblewrap works on this host; else why not (checked once per process: it costs ~10 ms)."""
    import shutil
    import subprocess

    path = shutil.which("bwrap")
    if path is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    if path not in _bwrap_checked:
        try:
            probe = subprocess.run([path, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "true"],
                                   capture_output=True, timeout=30)  # fmt: skip
            problem = None if probe.returncode == 0 else probe.stderr.decode(errors="replace").strip()[:300]
        except (OSError, subprocess.TimeoutExpired) as e:
            problem = str(e)
        _bwrap_checked[path] = problem and f"{path} cannot create namespaces here ({problem})"
    return _bwrap_checked[path]


# ---------------------------------------------------------------------------------------------------------
# Running the child


def _run_child(sandbox_dir: str, timeout: float, memory_bytes: int, isolation: str, python_only: bool):
    import subprocess

    # The child reports "started", any denied action, and a final JSON verdict on a private pipe, so the
    # program's own output cannot be confused with them.
    report_read, report_write = os.pipe()
    inherited = [report_write]
    try:
        # Inside bwrap's pid namespace the parent's pid means nothing: 0 tells the child not to check it.
        parent_pid = os.getpid() if isolation == "process" else 0
        mode = child.NO_KERNEL_LAYERS if python_only else "kernel"
        args = [str(report_write), str(memory_bytes), repr(timeout), str(parent_pid), mode]
        command = [sys.executable, "-I", "-S", "-B", os.path.abspath(child.__file__), "--isolate", *args]
        if isolation == "bwrap":  # bwrap copies the program from a descriptor into the child's own temp dir
            inherited.append(os.open(os.path.join(sandbox_dir, child.PROGRAM_FILE), os.O_RDONLY))
            command = _bwrap_command(sandbox_dir, inherited[-1]) + command
        proc = subprocess.Popen(
            command,
            cwd=sandbox_dir,
            env=_child_environment(sandbox_dir),
            stdin=subprocess.DEVNULL,  # input() raises EOFError instead of waiting
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=inherited,
            start_new_session=True,  # own process group, killed as a whole below
        )
    except BaseException:
        os.close(report_read)
        raise
    finally:
        for fd in inherited:
            os.close(fd)
    report = _Report()
    with proc:
        stdout_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
        try:
            outputs, timed_out = _collect_output(proc, report_read, report, timeout)
        finally:
            os.close(report_read)
            _kill_group_and_reap(proc)
    if report.layers is not None:
        _log_layers(isolation, report.layers, python_only)
    stdout = _decode(outputs[stdout_fd], _MAX_OUTPUT_BYTES)
    stderr = _decode(outputs[stderr_fd], _MAX_OUTPUT_BYTES)
    returncode = proc.returncode
    if isolation == "bwrap" and returncode > 128:  # bwrap exits with 128 + N when its child is killed by signal N
        returncode = -(returncode - 128)
    return _classify(returncode, stdout, stderr, report, timed_out, timeout)


def _child_environment(sandbox_dir: str) -> dict[str, str]:
    # A minimal environment: no secrets from the caller's, temp files land in the sandbox, one BLAS thread.
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": sandbox_dir,
        "TMPDIR": sandbox_dir,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


def _bwrap_command(sandbox_dir: str, program_fd: int) -> list[str]:
    """bubblewrap arguments: a filesystem of only /usr, the interpreter, the child script and a temp dir of its
    own (a size-limited tmpfs at the same path, the program copied in from `program_fd`).

    Binding / read-only would not do: connecting to a unix socket needs no write access to a read-only mount, so
    the host's sockets (Docker's, a database's) would stay reachable. Paths keep their host names inside, so the
    child's command line and sys.executable need no translation.
    """
    import shutil

    command = [shutil.which("bwrap"), "--die-with-parent", "--unshare-all", "--cap-drop", "ALL",
               "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]  # fmt: skip
    for path in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
                 "/etc/localtime"):  # fmt: skip
        if os.path.islink(path):  # merged /usr: /lib -> usr/lib
            command += ["--symlink", os.readlink(path), path]
        elif os.path.exists(path):
            command += ["--ro-bind", path, path]
    # The interpreter (a venv's too) and the child script, unless already inside a directory bound above.
    runtime = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)}
    runtime.add(os.path.realpath(child.__file__))
    for path in sorted(runtime):
        if path.partition("/")[2].partition("/")[0] not in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            command += ["--ro-bind", path, path]
    program = os.path.join(sandbox_dir, child.PROGRAM_FILE)
    return command + ["--size", str(child.TEMP_DIR_BYTES), "--perms", "0700", "--tmpfs", sandbox_dir,
                      "--perms", "0600", "--file", str(program_fd), program, "--chdir", sandbox_dir, "--"]  # fmt: skip


class _Report:
    """The report pipe, read line by line as it arrives, in bounded memory: the kernel layers (from the
    "started" line), the first violation, and the last line (the verdict). Nothing the program writes to the
    pipe can push a violation out of view: every line is looked at, however many there are."""

    def __init__(self) -> None:
        self.layers: str | None = None
        self.violation: str | None = None
        self.last_line = ""
        self._line = bytearray()

    def feed(self, chunk: bytes) -> None:
        *complete, rest = chunk.split(b"\n")
        for part in complete:
            self._line += part[: max(0, _MAX_REPORT_LINE - len(self._line))]
            self._take(self._line.decode("utf-8", errors="replace"))
            self._line = bytearray()
        self._line += rest[: max(0, _MAX_REPORT_LINE - len(self._line))]

    def _take(self, line: str) -> None:
        if not line:
            return  # the child starts its own lines with a newline, to end any half line the program left
        if line.startswith(child.STARTED) and self.layers is None:
            self.layers = line[len(child.STARTED) :]
        elif line.startswith(child.VIOLATION) and self.violation is None:
            self.violation = line[len(child.VIOLATION) :]
        self.last_line = line

    def verdict(self) -> dict | None:
        # The child writes its verdict last; a program that forges one earlier is overridden by the real one.
        try:
            verdict = json.loads(self.last_line)
        except ValueError:
            return None
        return verdict if isinstance(verdict, dict) and {"outcome", "error"} <= verdict.keys() else None


def _collect_output(proc, report_fd: int, report: _Report, timeout: float) -> tuple[dict, bool]:
    """Read stdout, stderr and the report pipe until the child has exited; returns (outputs, timed_out)."""
    import selectors

    streams = (proc.stdout.fileno(), proc.stderr.fileno())
    outputs = {fd: bytearray() for fd in streams}
    deadline = time.monotonic() + _STARTUP_LIMIT_S
    started = False
    with selectors.DefaultSelector() as selector:
        selector.register(report_fd, selectors.EVENT_READ)  # first: a violation is seen before a flood
        for fd in streams:
            selector.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return outputs, True
            if not selector.get_map():
                # All pipes are closed; normally the child is exiting, but a program can close them and go on.
                if _has_exited(proc.pid):
                    return outputs, False
                time.sleep(min(remaining, 0.01))
                continue
            for key, _ in sorted(selector.select(remaining), key=lambda ready: ready[0].fd != report_fd):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                elif key.fd == report_fd:
                    report.feed(chunk)
                    if not started and report.layers is not None:
                        started = True
                        deadline = time.monotonic() + timeout
                else:
                    # Keep reading past the cap so the child never blocks on a full pipe, but keep at most one
                    # byte more than the cap: enough for _decode to tell that the output was truncated.
                    buffer = outputs[key.fd]
                    buffer += chunk[: max(0, _MAX_OUTPUT_BYTES + 1 - len(buffer))]


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the child unreaped: its pid, which is also its process group id, cannot be reused yet.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group_and_reap(proc) -> None:
    # Kill the whole group before reaping the leader, so the group id still names our group: this ends a
    # timed-out program. (It cannot have started anything else: the child's seccomp filter and audit hook
    # refuse new processes and sessions; under bwrap its pid namespace dies with it.)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _decode(data: bytearray, cap: int) -> str:
    text = data[:cap].decode("utf-8", errors="replace")
    return text + "\n[output truncated]\n" if len(data) > cap else text


_logged: set[tuple[str, str, bool]] = set()


def _log_layers(isolation: str, layers: str, python_only: bool) -> None:
    """Say once per process (and again if it changes) which layers are active and which are missing."""
    if (isolation, layers, python_only) in _logged:
        return
    _logged.add((isolation, layers, python_only))
    active = [name for name in layers.split(",") if name]
    if isolation == "bwrap":  # bwrap's own size-limited temp dir stands in for the child's tmpfs
        active = [name for name in active if name != "tmpfs"] + ["tmpfs"]
    missing = [name for name in child.KERNEL_LAYERS if name not in active]
    if isolation != "bwrap":
        missing.insert(0, f"bwrap ({_bwrap_problem() or 'not requested'})")
    note = " [TEST SWITCH: kernel layers off]" if python_only else ""
    log.info("sandbox%s: active layers: %s; missing: %s (docs/SECURITY.md says what each adds)", note,
             ", ".join((["bwrap"] if isolation == "bwrap" else []) + active + ["audit hook"]),
             ", ".join(missing) or "none")  # fmt: skip


def _classify(returncode: int, stdout: str, stderr: str, report: _Report, timed_out: bool, timeout: float):
    if report.violation is not None:  # the first denied action is the most telling, even if the program went on
        return ExecutionResult(False, stdout, stderr, report.violation, timeout=timed_out)
    if timed_out or returncode == -signal.SIGXCPU:
        error = f"Execution timed out after {timeout:g} s"
        return ExecutionResult(False, stdout, stderr, error, timeout=True)
    verdict = report.verdict()
    if verdict is None:
        # Died without a verdict: killed by the kernel (memory limit, OOM killer) or crashed.
        if returncode == -signal.SIGKILL or "MemoryError" in stderr:
            return ExecutionResult(False, stdout, stderr, "Memory limit exceeded", memory_exceeded=True)
        if returncode == child.EXIT_REPORT_CLOSED:
            return ExecutionResult(False, stdout, stderr, "sandbox: a disabled action, after the program closed or "
                                   "replaced the sandbox's report pipe")  # fmt: skip
        if returncode == -signal.SIGSYS:
            return ExecutionResult(False, stdout, stderr, "sandbox: a system call that the sandbox forbids (seccomp "
                                   "killed the program; e.g. a new process, a socket or memfd_create)")  # fmt: skip
        last_line = (stderr.strip().splitlines() or [""])[-1]
        if returncode < 0:
            return ExecutionResult(False, stdout, stderr, f"Process killed by {_signal_name(-returncode)}: {last_line}")
        return ExecutionResult(False, stdout, stderr, f"Process exited with code {returncode}: {last_line}")
    if verdict["outcome"] == "ok" and returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    error = verdict["error"] or f"Process exited with code {returncode}"
    return ExecutionResult(False, stdout, stderr, error, memory_exceeded=verdict["outcome"] == "memory")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
