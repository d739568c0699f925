"""Sandboxed execution of model-written Python (used by HumanEval-style scoring).

`execute_code(code)` runs the program in a fresh interpreter (`python -I -S -B <this file>`), never by forking
the caller: the caller may be a worker thread of a Gradio/Dagster process with torch loaded, where forking is
unsafe and SIGALRM is unavailable. The child gets its own session, so the parent can enforce the wall-clock
limit by killing the whole process group. The child runs this file twice, as two stages of one process (the
second replaces the first with `execv`, which keeps the pid and everything the kernel was told):

1. `--isolate`, best-effort kernel isolation, done with ctypes. Each step is skipped where the kernel or the
   user's privileges do not allow it, and none can be undone by the program:
   - PR_SET_PDEATHSIG: the child dies with its parent;
   - a new network namespace: nothing is reachable, not even the host's 127.0.0.1;
   - a size-limited tmpfs over the temp dir, in a mount namespace of its own: many files cannot fill the disk;
   - no capabilities: a child of root keeps uid 0 but loses root's powers (device nodes, ptrace, renicing or
     signalling other users' processes, raising limits, ...), also across the exec below;
   - Landlock (Linux >= 5.13): files outside the temp dir are read-only, and only the interpreter's own files
     (its prefix, shared libraries, /usr, /dev/null, ...) are readable at all; no TCP; no signals to processes
     outside the sandbox.
2. `--run`: a fresh interpreter that never loads ctypes (once loaded, its types read and write raw memory
   without any audit event) sets resource limits (memory, file size, CPU time, no core dumps), installs an
   audit hook (`sys.addaudithook`, which cannot be removed), applies the reliability guard (dangerous functions
   replaced by stubs that raise), and runs the program.

The audit hook denies network access, process creation, signals to other processes, ctypes, threads, signal
handlers, tracing, new audit hooks, heap walking, hand-made code objects (`code.__new__`, and `marshal` of
anything but the standard library's own .pyc files), and every read or write outside what the program needs:
writes only inside the temp dir, reads only there and in the standard library. Any denied action fails the run,
even if the program catches the exception: the hook reports it to the parent on a private pipe at once. The
hook binds everything it uses when it is created, so a program that replaces builtins, module attributes or
module globals (all of which it can reach, e.g. through `object.__subclasses__()`) cannot change what the hook
decides; and no program code can run in the middle of a check (no threads, signal handlers, trace functions
or audit hooks of its own; no garbage collection, hence no `__del__`, during the check).

`isolation="bwrap"` (or NANOCHAT_SANDBOX=bwrap) runs both stages inside bubblewrap as well: a mount namespace
in which only the interpreter, /usr and the temp dir exist (the rest of the host filesystem, /proc and the host's
unix sockets are simply absent), new pid/ipc/uts/network namespaces, no capabilities, killed with the parent.

This is not a security boundary against a program written to attack it: a CPython memory-safety bug (one of
the known interpreter crashers) runs native code that no Python-level check sees. Without bwrap, only the kernel
layers above are left then, and only where the kernel has them. Nor is the verdict tamper-proof: a program can
fake passing its tests (an object whose `__eq__` is always True, or a fake verdict on the report pipe, or the
json module replaced). See docs/SECURITY.md.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import struct
import sys
import time
from dataclasses import dataclass

# json, selectors, shutil, subprocess and tempfile are imported where they are used: every run starts two
# interpreters on this file (see above), and the child needs none of them to start.

_MAX_OUTPUT_BYTES = 1 << 20  # per stream: a print loop must not exhaust the parent's memory
_MAX_REPORT_BYTES = 64 * 1024
_MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: the temp dir may live on a RAM-backed /tmp
_TEMP_DIR_BYTES = 64 * 1024 * 1024  # all files together, where the temp dir can be a tmpfs of its own
_STARTUP_LIMIT_S = 10.0  # time the child may take to start; the program's own clock starts after that
_PROGRAM_FILE = "program.py"  # written into the temp dir by the parent; read and deleted by the child
_PROGRAM_NAME = "<program>"  # the file name shown in tracebacks
_ISOLATIONS = ("process", "bwrap")
_VIOLATION = "violation "  # report-pipe lines starting with this name a denied action
_EXIT_REPORT_CLOSED = 70  # the child's exit code when a denied action cannot be reported: the pipe was closed


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

    `isolation`: "process" (the default) or "bwrap" (bubblewrap around it, see the module docstring); None reads
    NANOCHAT_SANDBOX. Asking for bwrap where it is not installed is an error, never a silent downgrade.
    """
    import shutil
    import tempfile

    isolation = isolation or os.environ.get("NANOCHAT_SANDBOX") or "process"
    if isolation not in _ISOLATIONS:
        raise ValueError(f"unknown sandbox isolation {isolation!r} (NANOCHAT_SANDBOX): expected one of {_ISOLATIONS}")
    if isolation == "bwrap" and shutil.which("bwrap") is None:
        raise RuntimeError("sandbox isolation 'bwrap' needs bubblewrap: apt-get install bubblewrap")
    sandbox_dir = os.path.realpath(tempfile.mkdtemp(prefix="nanochat-sandbox-"))
    try:
        program_path = os.path.join(sandbox_dir, _PROGRAM_FILE)
        with open(program_path, "w", encoding="utf-8", errors="surrogatepass") as f:
            f.write(code)
        return _run_child(sandbox_dir, timeout, maximum_memory_bytes or 0, isolation)
    finally:
        # Entries are always removable by their owner: the program cannot chmod or chown (see _DENIED_EVENTS).
        shutil.rmtree(sandbox_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Parent side


def _run_child(sandbox_dir: str, timeout: float, memory_bytes: int, isolation: str) -> ExecutionResult:
    import subprocess

    # The child reports "started", any denied action, and a final JSON verdict on a private pipe, so the
    # program's own output cannot be confused with them.
    report_read, report_write = os.pipe()
    inherited = [report_write]
    try:
        # Inside bwrap's pid namespace the parent's pid means nothing: 0 tells the child not to check it.
        parent_pid = os.getpid() if isolation == "process" else 0
        args = [str(report_write), str(memory_bytes), str(float(timeout)), str(parent_pid)]
        command = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--isolate", *args]
        if isolation == "bwrap":  # bwrap copies the program from a descriptor into the child's own temp dir
            inherited.append(os.open(os.path.join(sandbox_dir, _PROGRAM_FILE), os.O_RDONLY))
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


def _bwrap_command(sandbox_dir: str, program_fd: int) -> list[str]:
    """bubblewrap arguments: a filesystem of only /usr, the interpreter, this file and a temp dir of its own (a
    size-limited tmpfs at the same path, the program copied in from `program_fd`).

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
    # The interpreter (a venv's too) and this file, unless already inside a directory bound above.
    runtime = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix)}
    runtime.add(os.path.realpath(__file__))
    for path in sorted(runtime):
        if path.partition("/")[2].partition("/")[0] not in ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            command += ["--ro-bind", path, path]
    program = os.path.join(sandbox_dir, _PROGRAM_FILE)
    return command + ["--size", str(_TEMP_DIR_BYTES), "--perms", "0700", "--tmpfs", sandbox_dir, "--perms", "0600",
                      "--file", str(program_fd), program, "--chdir", sandbox_dir, "--"]  # fmt: skip


def _collect_output(proc, report_fd: int, timeout: float) -> tuple[dict, bool]:
    """Read stdout, stderr and the report pipe until the child has exited; returns (outputs, timed_out)."""
    import selectors

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


def _kill_group_and_reap(proc) -> None:
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
    lines = report.splitlines()
    violations = [line[len(_VIOLATION) :] for line in lines if line.startswith(_VIOLATION)]
    if violations:  # the first denied action is the most telling, even if the program went on and timed out
        return ExecutionResult(False, stdout, stderr, violations[0], timeout=timed_out)
    if timed_out or returncode == -signal.SIGXCPU:
        error = f"Execution timed out after {timeout:g} s"
        return ExecutionResult(False, stdout, stderr, error, timeout=True)
    verdict = _last_verdict(lines)
    if verdict is None:
        # Died without a verdict: killed by the kernel (memory limit, OOM killer) or crashed.
        if returncode == -signal.SIGKILL or "MemoryError" in stderr:
            return ExecutionResult(False, stdout, stderr, "Memory limit exceeded", memory_exceeded=True)
        if returncode == _EXIT_REPORT_CLOSED:
            return ExecutionResult(False, stdout, stderr, "sandbox: a disabled action, after the program closed the "
                                   "sandbox's report pipe")  # fmt: skip
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


def _last_verdict(lines: list[str]) -> dict | None:
    # The child writes its verdict last; a program that forges one earlier is overridden by the real one.
    import json

    try:
        verdict = json.loads(lines[-1])
    except (IndexError, ValueError):
        return None
    return verdict if isinstance(verdict, dict) and {"outcome", "error"} <= verdict.keys() else None


# ---------------------------------------------------------------------------------------------------------
# Child side, stage 1 (--isolate): kernel isolation through ctypes, then exec stage 2.

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Landlock: the syscall numbers are the same on every Linux architecture (they postdate the split tables).
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_LL_EXECUTE, _LL_WRITE_FILE, _LL_READ_FILE, _LL_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
_LL_MAKE_CHAR, _LL_MAKE_BLOCK, _LL_TRUNCATE, _LL_IOCTL_DEV = 1 << 6, 1 << 11, 1 << 14, 1 << 15
_LL_FILE_RIGHTS = _LL_EXECUTE | _LL_WRITE_FILE | _LL_READ_FILE | _LL_TRUNCATE | _LL_IOCTL_DEV  # all a file may get
_LL_READ_ONLY = _LL_EXECUTE | _LL_READ_FILE | _LL_READ_DIR


def _isolate_main(argv: list[str]) -> None:
    report_fd, parent_pid = int(argv[0]), int(argv[3])
    sandbox_dir = os.path.realpath(os.getcwd())
    layers = _isolate_kernel(parent_pid, sandbox_dir)
    stage2 = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--run", *argv, ",".join(layers)]
    try:
        os.execv(sys.executable, stage2)
    except OSError as e:  # e.g. Landlock refused a file the interpreter needs: fail closed, and say why
        import json

        error = f"sandbox: cannot start the sandboxed interpreter ({e}); kernel layers: {layers}"
        os.write(report_fd, json.dumps({"outcome": "error", "error": error}).encode() + b"\n")
        os._exit(1)


def _isolate_kernel(parent_pid: int, sandbox_dir: str) -> list[str]:
    """Best-effort kernel isolation of this process (kept across exec); returns the layers that took effect."""
    if not sys.platform.startswith("linux"):
        return []  # every layer below is Linux's; elsewhere only the Python-level checks hold
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return []
    libc.syscall.restype = ctypes.c_long
    layers = []
    # Die with the parent thread (e.g. a crashed worker) instead of lingering; stop if it is already gone.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)
    if _unshare_network(libc):
        layers.append("netns")
    if _mount_private_temp_dir(libc, sandbox_dir):
        layers.append("tmpfs")
    # No new privileges: exec can never grant any (setuid, file capabilities); Landlock requires it.
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if _drop_capabilities(ctypes, libc):  # before Landlock, which hides /proc
        layers.append("no-capabilities")
    if _restrict_with_landlock(ctypes, libc, sandbox_dir):
        layers.append("landlock")
    return layers


def _unshare_network(libc) -> bool:
    # A fresh network namespace has only a downed loopback device. Root can create one directly; other users
    # need a user namespace too, mapping their own ids so that the temp dir stays theirs.
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(_CLONE_NEWNET) == 0:
        return True
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNET) != 0:
        return False
    id_maps = (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1"))
    for name, content in id_maps:
        try:
            with open(f"/proc/self/{name}", "w") as f:
                f.write(content)
        except OSError:
            pass
    return True


def _mount_private_temp_dir(libc, sandbox_dir: str) -> bool:
    """Mount a size-limited tmpfs over the temp dir, in a mount namespace of our own: RLIMIT_FSIZE caps each
    file, this caps them all, so that a program writing file after file cannot fill the host's disk (or RAM,
    where /tmp is a tmpfs). Needs the privilege to create a mount namespace: root, or the user namespace made
    by _unshare_network. The parent keeps seeing the (empty) directory it made, and removes it as usual."""
    with open(_PROGRAM_FILE, "rb") as f:
        program = f.read()
    if libc.unshare(_CLONE_NEWNS) != 0:
        return False
    # Make every mount private first, so that the tmpfs below never propagates to the host's namespace.
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return False
    options = f"size={_TEMP_DIR_BYTES},nr_inodes=4096,mode=0700,uid={os.getuid()},gid={os.getgid()}"
    if libc.mount(b"tmpfs", sandbox_dir.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode()) != 0:
        return False
    os.chdir(sandbox_dir)  # the working directory still was the directory underneath the new mount
    with open(os.open(_PROGRAM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(program)
    return True


def _restrict_with_landlock(ctypes, libc, sandbox_dir: str) -> bool:
    """Landlock: read-only runtime files, a writable temp dir, nothing else; no TCP, no signals out."""

    def syscall(number: int, *args) -> int:  # syscall() takes longs: say so, ctypes would pass 32-bit ints
        return libc.syscall(number, *(ctypes.c_long(a) if isinstance(a, int) else a for a in args))

    abi = syscall(_SYS_LANDLOCK_CREATE_RULESET, None, 0, _LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return False  # not built into this kernel, or disabled
    # Handle every right this ABI knows, so that each one is denied unless a rule below grants it.
    fs_rights = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    fs_rights |= (1 << 13 if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0) | (_LL_IOCTL_DEV if abi >= 5 else 0)
    net_rights = 0b11 if abi >= 4 else 0  # bind and connect TCP: no rule grants them
    scopes = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals outside this sandbox
    attr_size = 8 if abi < 4 else 16 if abi < 6 else 24
    attr = ctypes.create_string_buffer(struct.pack("=QQQ", fs_rights, net_rights, scopes)[:attr_size], attr_size)
    ruleset = syscall(_SYS_LANDLOCK_CREATE_RULESET, attr, attr_size, 0)
    if ruleset < 0:
        return False
    try:
        sandbox_rights = fs_rights & ~(_LL_EXECUTE | _LL_MAKE_CHAR | _LL_MAKE_BLOCK | _LL_IOCTL_DEV)
        rules = [(sandbox_dir, sandbox_rights), ("/dev/null", _LL_READ_FILE | _LL_WRITE_FILE | _LL_TRUNCATE)]
        rules += [(path, _LL_READ_ONLY) for path in _runtime_paths()]
        for path, rights in rules:
            try:
                path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not on this system
            try:
                if not os.path.isdir(f"/proc/self/fd/{path_fd}"):
                    rights &= _LL_FILE_RIGHTS
                rule = ctypes.create_string_buffer(struct.pack("=Qi", rights & fs_rights, path_fd), 12)
                syscall(_SYS_LANDLOCK_ADD_RULE, ruleset, _LANDLOCK_RULE_PATH_BENEATH, rule, 0)
            finally:
                os.close(path_fd)
        return syscall(_SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0) == 0
    finally:
        os.close(ruleset)


def _runtime_paths() -> set[str]:
    """What the interpreter reads to start and import the standard library: its prefixes, every shared library
    mapped into this process (wherever the distribution keeps them), /usr, and a few files and devices."""
    paths = {"/usr", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime", "/dev/zero",
             "/dev/urandom", "/dev/random", "/sys/devices/system/cpu"}  # fmt: skip
    paths.update(os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix))
    paths.add(os.path.realpath(__file__))
    paths.add(os.path.join(os.path.realpath(sys.prefix), "pyvenv.cfg"))  # a venv: its config, not its packages
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                paths.add(os.path.dirname(fields[5].rstrip("\n")))
    return paths


def _drop_capabilities(ctypes, libc) -> bool:
    """Empty the bounding, ambient, effective, permitted and inheritable sets. Root keeps uid 0, but an exec
    gives uid 0 only the bounding set's capabilities, so the next stage starts with none."""
    with open("/proc/self/status") as f:
        if all(int(line.split()[1], 16) == 0 for line in f if line.startswith(("CapEff:", "CapPrm:"))):
            return True  # an ordinary user: nothing to drop (and no privilege to shrink the bounding set)
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
    except (OSError, ValueError):
        last_cap = 63
    for cap in range(last_cap + 1):
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # needs CAP_SETPCAP, so before capset below
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = ctypes.create_string_buffer(struct.pack("=Ii", _LINUX_CAPABILITY_VERSION_3, 0), 8)  # pid 0: this one
    data = ctypes.create_string_buffer(24)  # two {effective, permitted, inheritable} words, all zero
    return libc.capset(header, data) == 0


# ---------------------------------------------------------------------------------------------------------
# Child side, stage 2 (--run): limits, audit hook, reliability guard, the program.

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
    "os.symlink": "creating symlinks",  # also keeps every path inside the temp dir free of symlinks
    "os.chmod": "changing permissions",  # also keeps the temp dir removable by a non-root parent
    "os.chown": "changing ownership",
    "resource.setrlimit": "changing resource limits",
    "resource.prlimit": "changing resource limits",
    "gc.get_objects": "heap introspection",
    "gc.get_referrers": "heap introspection",
    "gc.get_referents": "heap introspection",
    "sqlite3.enable_load_extension": "loading native code",
    "sqlite3.load_extension": "loading native code",
    # ATTACH DATABASE writes any file, and no audit event reports it.
    "sqlite3.connect": "sqlite3 (ATTACH DATABASE allows writing files anywhere)",
    # A hook, trace or profile function added by the program would run its code in the middle of the checks
    # below (between a check and the checked call).
    "sys.addaudithook": "adding audit hooks",
    "sys.settrace": "tracing",
    "sys.setprofile": "tracing",
    "sys.monitoring.register_callback": "tracing",  # Python >= 3.12
    "_thread.start_new_thread": "starting threads",  # Python >= 3.13; the guard stubs the function before that
    "code.__new__": "creating code objects",  # hand-made bytecode can read and write arbitrary memory
    "fcntl.ioctl": "ioctl",  # device and filesystem controls: nothing a program here needs
}
_DENIED_EVENT_PREFIXES = {
    "socket.": "network access",
    "ctypes.": "native code (ctypes)",
    "syslog.": "the system log",  # /dev/log is a unix socket, outside any network namespace
}
# Audit events that modify a path: event -> indices of the path arguments.
_WRITE_EVENTS = {
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "os.utime": (0,),
    "os.rename": (0, 1),
    "os.link": (0, 1),
    "os.truncate": (0,),
    "os.setxattr": (0,),
    "os.removexattr": (0,),
    "os.chflags": (0,),
    "os.lchflags": (0,),
}
# Audit events that read a path (or list a directory): event -> index of the path argument.
_READ_EVENTS = {"os.listdir": 0, "os.scandir": 0, "os.getxattr": 0, "os.listxattr": 0}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Readable besides the temp dir and the standard library: devices and data that the stdlib itself reads.
_READABLE_EXTRA = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/usr/share/zoneinfo")
_DISABLED_EVENT = "nanochat.sandbox.disabled"  # raised by the guard's stubs, so the hook reports them too

# Modules whose fresh import is denied: native code, process spawning, subinterpreters (which would not
# inherit the audit hook), files in /dev/shm (shared memory, named semaphores), C code that reads or writes
# files or sockets without audit events, and the modules the original guard poisoned.
_BLOCKED_MODULES = {
    "ctypes", "_ctypes", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels", "_interpreters",
    "_interpchannels", "_interpqueues", "_testcapi", "_testinternalcapi", "_testmultiphase",
    "_testsinglephase", "_testbuffer", "_testimportmultiple", "_posixshmem", "_multiprocessing", "spwd",
    "nis", "ossaudiodev", "_dbm", "_gdbm", "readline", "_tkinter", "tkinter", "psutil", "ipdb", "joblib",
}  # fmt: skip

# The reliability guard: functions replaced by raising stubs (module -> names). Unlike the original guard, the
# path operations that the audit hook checks (remove, unlink, rename, replace, rmdir, truncate, link) stay
# available inside the temp dir: tempfile, for one, needs to delete its own files. The os names are also
# replaced in `posix`, which holds the same functions; a second copy of a built-in module cannot be made
# (_imp.create_builtin), and a second copy of an extension module is checked by the "import" event. The shutil
# functions that the original guard removed (rmtree, move, chown) raise audit events that the hook checks.
_DISABLED_FUNCTIONS = {
    "os": (
        "system", "popen", "kill", "killpg", "fork", "forkpty", "execv", "execve", "execl", "execle",
        "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
        "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "pidfd_open", "chmod", "fchmod",
        "lchmod", "chown", "fchown", "lchown", "chroot", "mknod", "mkfifo", "symlink", "putenv", "unsetenv",
        "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setsid",
        "setpgid", "setpgrp", "_exit", "abort", "setpriority", "sched_setscheduler", "sched_setparam",
        "sched_setaffinity", "unshare", "setns",
    ),
    "subprocess": ("Popen", "_fork_exec"),  # subprocess keeps its own reference to fork_exec
    "_posixsubprocess": ("fork_exec",),
    # Threads and signal handlers would run program code at any moment, e.g. in the middle of a check.
    "_thread": ("start_new_thread", "start_new", "start_joinable_thread"),
    "threading": ("_start_new_thread", "_start_joinable_thread"),
    "_signal": ("signal", "pthread_kill", "pidfd_send_signal"),
    "signal": ("signal", "pthread_kill", "pidfd_send_signal"),
    "_imp": ("create_builtin",),  # every built-in module is imported before the guard: see _preload_builtins
}  # fmt: skip
# (The original also removed the builtins exit, quit and help; with -S they do not exist in the first place.)

# Functions given str paths when called with path-like objects (pathlib uses these): the audit hook sees the
# argument before the call converts it, and a path-like object could answer differently the second time.
_STR_PATH_FUNCTIONS = {
    "os": ("open", "mkdir", "rmdir", "remove", "unlink", "rename", "replace", "link", "utime", "truncate",
           "listdir", "scandir"),
    "io": ("open",),
    "builtins": ("open",),
}  # fmt: skip


def _run_main(argv: list[str]) -> None:
    import json  # for the verdict
    import subprocess  # imported for the guard to stub: the program gets this copy (a fresh one cannot load)

    report_fd, memory_bytes, timeout = int(argv[0]), int(argv[1]), float(argv[2])
    exit_now = os._exit  # kept before the guard replaces it
    with open(_PROGRAM_FILE, encoding="utf-8", errors="surrogatepass") as f:
        source = f.read()
    os.remove(_PROGRAM_FILE)
    sandbox_dir = os.path.realpath(os.getcwd())

    _set_limits(memory_bytes, timeout)
    _preload_builtins()
    # This file too: tracebacks through the guard's wrappers show its lines.
    readable = [sandbox_dir, *_stdlib_dirs(), os.path.realpath(__file__), *_READABLE_EXTRA]
    sys.addaudithook(_make_audit_hook(sandbox_dir, tuple(readable), report_fd, exit_now))
    _reliability_guard(subprocess)

    # The parent's wall clock for the program starts now; the kernel layers are named for whoever debugs this.
    os.write(report_fd, f"started {argv[4] or 'no kernel layers'}\n".encode())
    outcome, error = _run_program(source)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the program may have closed or replaced it
            pass
    os.write(report_fd, json.dumps({"outcome": outcome, "error": error}).encode() + b"\n")
    exit_now(0)  # skip interpreter teardown and any atexit handlers the program registered


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


def _preload_builtins() -> None:
    # Import every built-in module now, so that _imp.create_builtin can be disabled: called again, it would
    # make a second copy of a module (posix, _thread, _signal) without the guard's stubs.
    for name in sys.builtin_module_names:
        if name not in _BLOCKED_MODULES:
            __import__(name)


def _stdlib_dirs() -> list[str]:
    # With -I -S, sys.path is the standard library only (its zip, its directory, lib-dynload).
    return [os.path.realpath(p) for p in sys.path if os.path.isdir(p)]


def _make_audit_hook(sandbox_dir: str, readable: tuple[str, ...], report_fd: int, exit_now):
    """The audit hook. It sees arguments before the audited call uses them, so it accepts only values that
    cannot change in between: str and bytes paths, int descriptors.

    The program can reach and change module attributes, module globals (through any function's __globals__)
    and builtins, but not this function's locals: so everything the hook calls is bound here, now, to C
    functions or to values of immutable types, and the hook never looks up a global or a builtin name.
    """
    import _stat
    import gc
    import posix

    type_, str_, bytes_, int_, bool_, tuple_, len_ = type, str, bytes, int, bool, tuple, len
    memoryview_, bytearray_, permission_error = memoryview, bytearray, PermissionError
    lstat, stat, readlink, getcwd, write = posix.lstat, posix.stat, posix.readlink, posix.getcwd, posix.write
    open_, read, close, read_only = posix.open, posix.read, posix.close, posix.O_RDONLY
    is_link, is_dir = _stat.S_ISLNK, _stat.S_ISDIR
    gc_isenabled, gc_disable, gc_enable = gc.isenabled, gc.disable, gc.enable
    fs_encoding = sys.getfilesystemencoding()
    denied_events = dict(_DENIED_EVENTS)
    denied_prefixes = tuple_(_DENIED_EVENT_PREFIXES.items())
    write_events, read_events = dict(_WRITE_EVENTS), dict(_READ_EVENTS)
    blocked_modules = frozenset(_BLOCKED_MODULES)
    write_flags, sandbox_prefix, report_closed = _WRITE_FLAGS, sandbox_dir + "/", _EXIT_REPORT_CLOSED
    violation, disabled_event = _VIOLATION.encode(), _DISABLED_EVENT
    # The standard library's .pyc file opened last: the import system unmarshals it right after opening it.
    pending_pyc = [None]

    def deny(message):
        message = "sandbox: " + message
        line = violation + message.replace("\n", " ").encode("utf-8", "backslashreplace") + b"\n"
        try:
            write(report_fd, line)
        except OSError:  # the program closed the report pipe: it cannot be told, so stop here
            exit_now(report_closed)
        raise permission_error(message)

    def text_of(path):
        """A str or bytes path as text; None for anything else (path-like objects, str subclasses)."""
        if type_(path) is str_:
            return path
        if type_(path) is bytes_:
            return path.decode(fs_encoding, "surrogateescape")
        return None

    def resolve(text):
        """The real path that `text` names: symlinks followed, as the kernel would; None if unresolvable."""
        if not text.startswith("/"):
            try:
                text = getcwd() + "/" + text
            except OSError:
                return None
        pending = text.split("/")
        pending.reverse()
        resolved, links = "", 0
        while pending:
            name = pending.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                resolved = resolved[: resolved.rfind("/")] if resolved else ""
                continue
            candidate = resolved + "/" + name
            try:
                mode = lstat(candidate).st_mode
            except OSError:  # missing (about to be created) or unreadable: the kernel will decide
                resolved = candidate
                continue
            if not is_link(mode):
                resolved = candidate
                continue
            links += 1
            if links > 40:
                return None
            try:
                target = readlink(candidate)
            except OSError:
                return None
            if target.startswith("/"):
                resolved = ""
            target_names = target.split("/")
            target_names.reverse()
            pending += target_names
        return resolved or "/"

    def inside_sandbox(real):
        return real == sandbox_dir or real.startswith(sandbox_prefix)

    def readable_path(real):
        for root in readable:
            if real == root or real.startswith(root + "/"):
                return True
        return False

    def climbs(text):
        """Whether a relative path goes above the directory it starts from. The program may hold descriptors
        of directories inside the temp dir, and calls such as os.open(dir_fd=) resolve relative paths from
        those, which the audit event does not say: a path that never climbs stays below any of them."""
        if text.startswith("/"):
            return False
        depth = 0
        for name in text.split("/"):
            if name == "..":
                depth -= 1
                if depth < 0:
                    return True
            elif name != "" and name != ".":
                depth += 1
        return False

    def check_path(event, path, writing):
        text = text_of(path)
        if text is None:
            deny(f"{event} with a path that is not a str or bytes is disabled; pass str(path)")
        real = resolve(text)
        if real is None:
            deny(f"{event} of a path that cannot be resolved is disabled ({text!r})")
        if writing and not inside_sandbox(real) and real != "/dev/null":
            deny(f"writing outside the sandbox directory is disabled ({event} {text!r})")
        if not writing and not readable_path(real):
            deny(f"reading outside the sandbox directory and the standard library is disabled ({event} {text!r})")
        if climbs(text):
            deny(f"relative paths that climb above their start are disabled ({event} {text!r})")
        return real

    def check_open(path, mode, flags):
        if type_(path) is int_ or type_(path) is bool_:
            return  # an already-open descriptor: wrapping it grants no new access
        # os.open and io.FileIO report flags; C code opening with fopen() reports only a mode ("a", "rb").
        writing = type_(flags) is not int_ or bool_(flags & write_flags)
        if type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode):
            writing = True
        text = text_of(path)
        real = resolve(text) if text is not None else None
        if real is not None and not inside_sandbox(real):
            try:
                directory = is_dir(stat(real).st_mode)
            except OSError:
                directory = False
            if directory:  # relative paths from its descriptor would escape all the checks
                deny(f"opening a directory outside the sandbox directory is disabled: it allows writing "
                     f"outside it ({text!r})")  # fmt: skip
        real = check_path("open", path, writing)
        if not writing and real.endswith(".pyc") and not inside_sandbox(real):
            pending_pyc[0] = real

    def unmarshals_stdlib_pyc(data):
        """Whether marshal.loads(data) is the import system loading the standard library's .pyc file that it
        has just opened. Any other code object could be hand-made bytecode, which reads and writes arbitrary
        memory; and the data is compared, so that opening a .pyc first does not let the program unmarshal
        something else."""
        path, pending_pyc[0] = pending_pyc[0], None
        if path is None or type_(data) not in (bytes_, memoryview_, bytearray_):
            return False
        fd = open_(path, read_only)  # raises "open" again: a readable file, allowed
        try:
            chunks = []
            while True:
                chunk = read(fd, 1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            close(fd)
        pending_pyc[0] = None
        return b"".join(chunks)[16:] == bytes_(data)  # after the 16-byte header (magic, flags, source stamp)

    def check(event, args):
        if event in denied_events:
            deny(f"{denied_events[event]} is disabled ({event})")
        for prefix, reason in denied_prefixes:
            if event.startswith(prefix):
                deny(f"{reason} is disabled ({event})")
        if event == disabled_event:
            name = args[0] if len_(args) and type_(args[0]) is str_ else "this function"
            deny(f"{name} is disabled")
        elif event == "open" and len_(args) == 3:
            check_open(args[0], args[1], args[2])
        elif event == "marshal.loads" or event == "marshal.load":
            if event == "marshal.load" or len_(args) != 1 or not unmarshals_stdlib_pyc(args[0]):
                deny(f"unmarshalling code objects is disabled ({event})")
        elif event in write_events:
            for index in write_events[event]:
                check_path(event, args[index], True)
        elif event in read_events:
            path = args[read_events[event]]
            if path is None:  # the working directory, which may have been changed to anywhere
                path = "."
            if type_(path) is not int_:  # a descriptor: of a directory inside the sandbox (see check_open)
                check_path(event, path, False)
        elif event == "import" and len_(args) >= 2:
            name, filename = args[0], args[1]
            if type_(name) is str_ and name.partition(".")[0] in blocked_modules:
                deny(f"importing {name} is disabled")
            if filename is not None:  # an extension module: native code, only the standard library's
                text = text_of(filename)
                real = resolve(text) if text is not None else None
                if real is None or inside_sandbox(real) or not readable_path(real):
                    deny(f"loading native code from outside the standard library is disabled ({text!r})")

    def hook(event, args):
        # Only sys.audit() called by the program can pass other types: such an event does nothing by itself.
        if type_(event) is not str_ or type_(args) is not tuple_:
            return
        # A garbage collection during the checks could run the program's __del__ methods in the middle.
        gc_was_enabled = gc_isenabled()
        gc_disable()
        try:
            check(event, args)
        finally:
            if gc_was_enabled:
                gc_enable()

    return hook


def _reliability_guard(subprocess) -> None:
    """Replace dangerous functions by stubs that raise, and drop cached modules that must not be reused."""
    import _imp
    import _signal
    import _thread
    import builtins
    import io
    import posix
    import threading

    modules = {"os": os, "subprocess": subprocess, "_thread": _thread, "threading": threading,
               "_signal": _signal, "signal": signal, "_imp": _imp, "io": io, "builtins": builtins,
               "_posixsubprocess": sys.modules.get("_posixsubprocess")}  # fmt: skip
    for module_name, names in _STR_PATH_FUNCTIONS.items():
        for name in names:
            setattr(modules[module_name], name, _with_str_paths(getattr(modules[module_name], name)))
    for module_name, names in _DISABLED_FUNCTIONS.items():
        targets = [modules[module_name]] + ([posix] if module_name == "os" else [])
        for module in targets:
            for name in names:
                if module is not None and hasattr(module, name):
                    setattr(module, name, _disabled(f"{module_name}.{name}"))
    # A fresh import of these is denied by the audit hook; forget the copies imported during startup.
    for name in list(sys.modules):
        if name.partition(".")[0] in _BLOCKED_MODULES:
            del sys.modules[name]


def _disabled(name: str):
    audit = sys.audit

    def stub(*args, **kwargs):
        audit(_DISABLED_EVENT, name)  # the hook reports the violation and raises
        raise PermissionError(f"sandbox: {name} is disabled")  # in case the program replaced sys.audit

    return stub


def _with_str_paths(function):
    fspath, pathlike = os.fspath, os.PathLike

    def call(*args, **kwargs):
        args = [fspath(a) if isinstance(a, pathlike) else a for a in args]
        kwargs = {k: fspath(v) if isinstance(v, pathlike) else v for k, v in kwargs.items()}
        return function(*args, **kwargs)

    call.__name__, call.__qualname__, call.__doc__ = function.__name__, function.__qualname__, function.__doc__
    return call


def _run_program(source: str) -> tuple[str, str | None]:
    """Run the program as the __main__ module; returns (outcome, error), outcome ok|error|memory."""
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
        return "error", traceback.format_exception_only(type(e), e)[-1].strip()
    return "ok", None


if __name__ == "__main__":
    if sys.argv[1] == "--isolate":
        _isolate_main(sys.argv[2:])
    else:
        _run_main(sys.argv[2:])
