"""Sandboxed execution of model-written Python (used by HumanEval-style scoring).

`execute_code(code)` runs the program in a fresh interpreter (`python -I -S -B <this file>`), never by forking
the caller: the caller may be a worker thread of a Gradio/Dagster process with torch loaded, where forking is
unsafe and SIGALRM is unavailable. The child gets its own session, so the parent can enforce the wall-clock
limit by killing the whole process group. Before the program runs, the child installs, in this order:

1. best-effort kernel isolation: a new network namespace (nothing reachable even if the Python guards below
   are bypassed) and PR_SET_PDEATHSIG (it dies with its parent);
2. resource limits: address space and data segment (memory), file size, CPU time (a backstop for the wall
   clock), process count (effective for non-root users only), no core dumps;
3. an audit hook (`sys.addaudithook`, which cannot be removed once installed) that denies network access,
   writes outside the temp dir, process creation, signals, ctypes and a few other escapes;
4. the original nanochat's "reliability guard": destructive os/shutil/subprocess functions are replaced by
   stubs that raise.

Any denied action fails the run, even if the program catches the exception. This guards against accidents of
generated code; it is not a security boundary against a program written to attack this module (one that
walks interpreter frames to forge the result, or crashes the interpreter to run native code). Also not
covered: reading files is allowed anywhere; the child sees only the standard library (-S); threads are
refused for non-root users (RLIMIT_NPROC counts them) but allowed for root; output still buffered when a
timeout kills the child is lost; the temp dir stays behind if the parent itself is SIGKILLed.
"""

from __future__ import annotations

import json
import math
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_MAX_OUTPUT_BYTES = 1 << 20  # per stream: a print loop must not exhaust the parent's memory
_MAX_REPORT_BYTES = 64 * 1024
_MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: the temp dir may live on a RAM-backed /tmp
_STARTUP_LIMIT_S = 10.0  # time the child may take to start; the program's own clock starts after that
_PROGRAM_FILE = "program.py"  # written into the temp dir by the parent; read and deleted by the child
_PROGRAM_NAME = "<program>"  # the file name shown in tracebacks


@dataclass
class ExecutionResult:
    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False


def execute_code(
    code: str, timeout: float = 5.0, maximum_memory_bytes: int | None = 256 * 1024 * 1024
) -> ExecutionResult:
    """Run `code` in a sandboxed child interpreter; `maximum_memory_bytes=None` means no memory limit."""
    sandbox_dir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat-sandbox-"))
    try:
        program_path = os.path.join(sandbox_dir, _PROGRAM_FILE)
        with open(program_path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        return _run_child(sandbox_dir, timeout, maximum_memory_bytes or 0)
    finally:
        # Entries are always removable by their owner: the program cannot chmod or chown (see _DENIED_EVENTS).
        shutil.rmtree(sandbox_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Parent side


def _run_child(sandbox_dir: str, timeout: float, memory_bytes: int) -> ExecutionResult:
    # The child reports "started" and then a final JSON line on a private pipe, so the program's own output
    # cannot be confused with the verdict.
    report_read, report_write = os.pipe()
    try:
        args = [str(report_write), str(memory_bytes), str(float(timeout)), str(os.getpid())]
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), *args],
            cwd=sandbox_dir,
            env=_child_environment(sandbox_dir),
            stdin=subprocess.DEVNULL,  # input() raises EOFError instead of waiting
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(report_write,),
            start_new_session=True,  # own process group, killed as a whole below
        )
    except BaseException:
        os.close(report_read)
        raise
    finally:
        os.close(report_write)
    with proc:
        stdout_fd, stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
        try:
            outputs, timed_out = _collect_output(proc, report_read, timeout)
        finally:
            os.close(report_read)
            _kill_group_and_reap(proc)
    stdout = _decode(outputs[stdout_fd], _MAX_OUTPUT_BYTES)
    stderr = _decode(outputs[stderr_fd], _MAX_OUTPUT_BYTES)
    report = _decode(outputs[report_read], _MAX_REPORT_BYTES)
    return _classify(proc.returncode, stdout, stderr, report, timed_out, timeout)


def _child_environment(sandbox_dir: str) -> dict[str, str]:
    # A minimal environment: no secrets from the caller's, temp files land in the sandbox, one BLAS thread.
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": sandbox_dir,
        "TMPDIR": sandbox_dir,
        "LANG": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
    }


def _collect_output(proc: subprocess.Popen, report_fd: int, timeout: float) -> tuple[dict, bool]:
    """Read stdout, stderr and the report pipe until the child has exited; returns (outputs, timed_out)."""
    caps = {proc.stdout.fileno(): _MAX_OUTPUT_BYTES, proc.stderr.fileno(): _MAX_OUTPUT_BYTES}
    caps[report_fd] = _MAX_REPORT_BYTES
    outputs = {fd: bytearray() for fd in caps}
    deadline = time.monotonic() + _STARTUP_LIMIT_S
    started = False
    with selectors.DefaultSelector() as selector:
        for fd in caps:
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
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fd)
                    continue
                # Keep reading past the cap so the child never blocks on a full pipe, but keep at most one
                # byte more than the cap: enough for _decode to tell that the output was truncated.
                buffer = outputs[key.fd]
                buffer += chunk[: max(0, caps[key.fd] + 1 - len(buffer))]
                if key.fd == report_fd and not started and b"\n" in buffer:
                    started = True
                    deadline = time.monotonic() + timeout


def _has_exited(pid: int) -> bool:
    # WNOWAIT leaves the child unreaped: its pid, which is also its process group id, cannot be reused yet.
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _kill_group_and_reap(proc: subprocess.Popen) -> None:
    # Kill the whole group before reaping the leader, so the group id still names our group: this ends a
    # timed-out program and anything it may have started.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _decode(data: bytearray, cap: int) -> str:
    text = data[:cap].decode("utf-8", errors="replace")
    return text + "\n[output truncated]\n" if len(data) > cap else text


def _classify(
    returncode: int, stdout: str, stderr: str, report: str, timed_out: bool, timeout: float
) -> ExecutionResult:
    if timed_out or returncode == -signal.SIGXCPU:
        error = f"Execution timed out after {timeout:g} s"
        return ExecutionResult(False, stdout, stderr, error, timeout=True)
    verdict = _last_verdict(report)
    if verdict is None:
        # Died without a verdict: killed by the kernel (memory limit, OOM killer) or crashed.
        if returncode == -signal.SIGKILL or "MemoryError" in stderr:
            return ExecutionResult(False, stdout, stderr, "Memory limit exceeded", memory_exceeded=True)
        last_line = (stderr.strip().splitlines() or [""])[-1]
        return ExecutionResult(False, stdout, stderr, f"Process exited with code {returncode}: {last_line}")
    if verdict["outcome"] == "ok" and returncode == 0:
        return ExecutionResult(True, stdout, stderr)
    error = verdict["error"] or f"Process exited with code {returncode}"
    return ExecutionResult(False, stdout, stderr, error, memory_exceeded=verdict["outcome"] == "memory")


def _last_verdict(report: str) -> dict | None:
    # The child writes its verdict last; a program that forges one earlier is overridden by the real one.
    lines = report.strip().splitlines()
    try:
        verdict = json.loads(lines[-1])
    except (IndexError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) and {"outcome", "error"} <= verdict.keys() else None


# ---------------------------------------------------------------------------------------------------------
# Child side: everything below runs in the sandboxed interpreter only.


class SandboxViolation(PermissionError):
    """Raised inside the child when the program attempts a disabled action."""


_VIOLATIONS: list[str] = []  # every action the sandbox denied, in order; any entry fails the run

# Audit events that are always denied, with the reason shown to the user.
_DENIED_EVENTS = {
    "os.system": "process creation",
    "os.exec": "process creation",
    "os.spawn": "process creation",
    "os.posix_spawn": "process creation",
    "os.fork": "process creation",
    "os.forkpty": "process creation",
    "subprocess.Popen": "process creation",
    "pty.spawn": "process creation",
    "os.kill": "signalling processes",
    "os.killpg": "signalling processes",
    "signal.pthread_kill": "signalling processes",
    "shutil.rmtree": "recursive deletion",
    "os.symlink": "creating symlinks",
    "os.chmod": "changing permissions",  # also keeps the temp dir removable by a non-root parent
    "os.chown": "changing ownership",
    "resource.setrlimit": "changing resource limits",
    "resource.prlimit": "changing resource limits",
    "gc.get_objects": "heap introspection",
    "gc.get_referrers": "heap introspection",
    "gc.get_referents": "heap introspection",
    "sqlite3.enable_load_extension": "loading native code",
    "sqlite3.load_extension": "loading native code",
}
_DENIED_EVENT_PREFIXES = {"socket.": "network access", "ctypes.": "native code (ctypes)"}

# Audit events that modify a path: event -> ((path argument index, dir_fd argument index or None), ...).
_PATH_EVENTS = {
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.mkdir": ((0, 2),),
    "os.utime": ((0, 3),),
    "os.rename": ((0, 2), (1, 3)),
    "os.link": ((0, 2), (1, 3)),
    "os.truncate": ((0, None),),
    "os.setxattr": ((0, None),),
    "os.removexattr": ((0, None),),
    "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

# Modules whose fresh import is denied: native code, process spawning, subinterpreters (which would not
# inherit the audit hook), and the modules the original guard poisoned.
_BLOCKED_MODULES = {
    "ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
    "_interpchannels", "_interpqueues", "_testcapi", "_testinternalcapi", "_testmultiphase",
    "_testsinglephase", "_dbm", "_gdbm", "readline", "_tkinter", "tkinter", "psutil", "ipdb", "joblib",
}  # fmt: skip

# The reliability guard: functions replaced by raising stubs (module -> names). The os names are also
# replaced in `posix`, which holds the same functions under the same names. Unlike the original guard, the
# path operations that the audit hook checks (remove, unlink, rename, replace, rmdir, truncate, link) stay
# available inside the temp dir: tempfile, for one, needs to delete its own files.
_DISABLED_FUNCTIONS = {
    "os": (
        "system", "popen", "kill", "killpg", "fork", "forkpty", "execv", "execve", "execl", "execle",
        "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
        "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "pidfd_open", "chmod", "fchmod",
        "lchmod", "chown", "fchown", "lchown", "chroot", "mknod", "mkfifo", "symlink", "putenv", "unsetenv",
        "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setsid",
        "setpgid", "_exit", "abort",
    ),
    "shutil": ("rmtree", "move", "chown"),
    "subprocess": ("Popen",),
    "_posixsubprocess": ("fork_exec",),
    "signal": ("pthread_kill", "pidfd_send_signal"),
}  # fmt: skip
# (The original also removed the builtins exit, quit and help; with -S they do not exist in the first place.)

_PR_SET_PDEATHSIG = 1
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000


def _child_main(argv: list[str]) -> None:
    report_fd, memory_bytes, timeout, parent_pid = int(argv[0]), int(argv[1]), float(argv[2]), int(argv[3])
    exit_now = os._exit  # kept before the guard replaces it
    with open(_PROGRAM_FILE, encoding="utf-8", errors="surrogatepass") as f:
        source = f.read()
    os.remove(_PROGRAM_FILE)
    sandbox_dir = os.path.realpath(os.getcwd())

    _isolate_kernel(parent_pid)
    _set_limits(memory_bytes, timeout)
    _install_audit_hook(sandbox_dir)
    _reliability_guard()

    os.write(report_fd, b"started\n")  # the parent's wall clock for the program starts now
    outcome, error = _run_program(source)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the program may have closed or replaced it
            pass
    os.write(report_fd, json.dumps({"outcome": outcome, "error": error}).encode() + b"\n")
    exit_now(0)  # skip interpreter teardown and any atexit handlers the program registered


def _isolate_kernel(parent_pid: int) -> None:
    """Best-effort kernel isolation; the Python-level guards must hold without it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return
    # Die with the parent thread (e.g. a crashed worker) instead of lingering; stop if it is already gone.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
    # A fresh network namespace has only a downed loopback device. Root can create one directly; other users
    # need a user namespace too, mapping their own ids so that the temp dir stays theirs.
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWNET) == 0 or libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        return
    id_maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
    for name, content in id_maps:
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(content)
        except OSError:
            pass


def _set_limits(memory_bytes: int, timeout: float) -> None:
    if memory_bytes:
        _lower_limit(resource.RLIMIT_AS, memory_bytes)
        _lower_limit(resource.RLIMIT_DATA, memory_bytes)
    _lower_limit(resource.RLIMIT_FSIZE, _MAX_FILE_BYTES)  # larger writes fail with EFBIG (SIGXFSZ is ignored)
    # SIGXCPU (reported as a timeout) if the wall clock somehow fails; the hard limit's SIGKILL comes later.
    cpu_seconds = math.ceil(timeout) + 1
    _lower_limit(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)
    _lower_limit(resource.RLIMIT_CORE, 0)
    # NPROC counts all of the user's processes and threads, so 0 forbids fork and threads; root ignores it.
    _lower_limit(resource.RLIMIT_NPROC, 0)


def _lower_limit(limit: int, soft: int, hard: int | None = None) -> None:
    # The hard limit too, so the program cannot raise it back; never above an existing hard limit.
    hard = soft if hard is None else hard
    _, current_hard = resource.getrlimit(limit)
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(limit, (soft, hard))


def _install_audit_hook(sandbox_dir: str) -> None:
    def hook(event: str, args: tuple) -> None:
        if event in _DENIED_EVENTS:
            _deny(f"{_DENIED_EVENTS[event]} is disabled ({event})")
        elif event.startswith(tuple(_DENIED_EVENT_PREFIXES)):
            _deny(f"{_DENIED_EVENT_PREFIXES[event.partition('.')[0] + '.']} is disabled ({event})")
        elif event == "open":
            path, mode, flags = args
            writing = flags & _WRITE_FLAGS or (isinstance(mode, str) and any(c in mode for c in "wax+"))
            # An int path wraps a descriptor the process already holds (stdout, a pipe, ...).
            if writing and not isinstance(path, int) and _real_path(path) != os.devnull:
                _check_inside(sandbox_dir, event, path)
        elif event in _PATH_EVENTS:
            for path_index, dir_fd_index in _PATH_EVENTS[event]:
                dir_fd = None if dir_fd_index is None else args[dir_fd_index]
                _check_inside(sandbox_dir, event, args[path_index], dir_fd)
        elif event == "import":
            name, filename = args[0], args[1]
            if name.partition(".")[0] in _BLOCKED_MODULES:
                _deny(f"importing {name} is disabled")
            if isinstance(filename, str) and _is_inside(sandbox_dir, filename):
                _deny(f"loading native code written by the program is disabled ({filename})")
        elif event == "sqlite3.connect" and args[0] not in (":memory:", ""):
            if str(args[0]).startswith("file:"):  # a URI may name any file, whatever its path looks like
                _deny("sqlite URIs are disabled (sqlite3.connect)")
            _check_inside(sandbox_dir, event, args[0])

    sys.addaudithook(hook)


def _check_inside(sandbox_dir: str, event: str, path: object, dir_fd: int | None = None) -> None:
    if not _is_inside(sandbox_dir, path, dir_fd):
        _deny(f"writing outside the sandbox directory is disabled ({event} {path!r})")


def _is_inside(sandbox_dir: str, path: object, dir_fd: int | None = None) -> bool:
    real = _real_path(path, dir_fd)
    return real is not None and (real == sandbox_dir or real.startswith(sandbox_dir + os.sep))


def _real_path(path: object, dir_fd: int | None = None) -> str | None:
    """The real path an audit event argument refers to, or None when it cannot be determined safely."""
    if isinstance(path, int):  # a file descriptor: ask the kernel which file it is
        return _fd_path(path)
    # Arbitrary os.PathLike objects could answer differently when the operation itself converts them.
    if not isinstance(path, (str, bytes)) and type(path).__module__ != "pathlib":
        return None
    path = os.fsdecode(path)
    if dir_fd not in (None, -1) and not os.path.isabs(path):  # -1: no dir_fd given
        base = _fd_path(dir_fd)
        if base is None:
            return None
        path = os.path.join(base, path)
    return os.path.realpath(path)


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def _deny(message: str) -> None:
    message = f"sandbox: {message}"
    _VIOLATIONS.append(message)
    raise SandboxViolation(message)


def _reliability_guard() -> None:
    """Replace destructive functions by stubs that raise, and drop cached modules that must not be reused."""
    import posix

    for module_name, names in _DISABLED_FUNCTIONS.items():
        modules = [sys.modules.get(module_name)] + ([posix] if module_name == "os" else [])
        for module in modules:
            for name in names:
                if module is not None and hasattr(module, name):
                    setattr(module, name, _disabled(f"{module_name}.{name}"))
    # os.open's audit event does not report dir_fd, so writes relative to a directory descriptor (which could
    # point outside the sandbox) are refused here; the hook checks the path against the working directory.
    os.open = posix.open = _open_without_dir_fd(posix.open)
    # A fresh import of these is denied by the audit hook; forget the copies imported during startup.
    for name in list(sys.modules):
        if name.partition(".")[0] in _BLOCKED_MODULES:
            del sys.modules[name]


def _disabled(name: str):
    def stub(*args, **kwargs):
        _deny(f"{name} is disabled")

    return stub


def _open_without_dir_fd(real_open):
    def open_(path, flags, mode=0o777, *, dir_fd=None):
        if dir_fd is not None and flags & _WRITE_FLAGS:
            _deny("writing relative to a directory descriptor is disabled (os.open)")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    return open_


def _run_program(source: str) -> tuple[str, str | None]:
    """Run the program as the __main__ module; returns (outcome, error), outcome ok|error|memory|blocked."""
    import linecache
    import traceback
    import types

    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    linecache.cache[_PROGRAM_NAME] = (len(source), None, source.splitlines(True), _PROGRAM_NAME)
    try:
        exec(compile(source, _PROGRAM_NAME, "exec"), main.__dict__)
    except MemoryError:
        main.__dict__.clear()  # free what the program holds, so reporting has memory to work with
        return "memory", "Memory limit exceeded"
    except BaseException as e:  # SystemExit too: a program that exits early has not passed its checks
        main.__dict__.clear()
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the program's frame on
        if not _VIOLATIONS:
            return "error", traceback.format_exception_only(type(e), e)[-1].strip()
    if _VIOLATIONS:  # even if the program caught the exception
        return "blocked", _VIOLATIONS[0]
    return "ok", None


if __name__ == "__main__":
    _child_main(sys.argv[1:])
