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

Docs: docs/SECURITY.md (threat model, what the sandbox does and does not stop).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from nanochat.execution import ExecutionResult, execute_code

TIMEOUT = 1.5  # seconds each attempt may run; long enough for a slow start, short for the loop attempts
SLACK = 3.0  # two interpreter starts and the reaping, on a busy 2-core machine


@dataclass(frozen=True)
class Attempt:
    id: str
    code: str
    expect: str  # blocked (a `sandbox:` error), timeout, memory, error (any other clear error), ok
    words: tuple[str, ...] = ()  # the error must contain these
    helper_parent: bool = False  # run from a helper process whose own environment holds the secret


def attempt(id: str, code: str, expect: str = "blocked", *words: str, helper_parent: bool = False) -> Attempt:
    return Attempt(id, textwrap.dedent(code).strip() + "\n", expect, words, helper_parent)


ATTEMPTS = [
    # --- writing outside the sandbox directory ------------------------------------------------------------
    attempt("open_write", "open(TARGET, 'w').write('x')", "blocked", "writing"),
    attempt("open_append_victim", "open(VICTIM, 'a').write('x')", "blocked", "writing"),
    attempt("pathlib_write", "import pathlib; pathlib.Path(TARGET).write_text('x')", "blocked", "writing"),
    attempt("os_open_creat", "import os; os.close(os.open(TARGET, os.O_WRONLY | os.O_CREAT))", "blocked", "writing"),
    attempt("io_fileio", "import io; io.FileIO(TARGET, 'w').write(b'x')", "blocked", "writing"),
    attempt("_io_open_direct", "import _io; _io.open(TARGET, 'w').write('x')", "blocked", "writing"),
    attempt("shutil_copy", "import shutil; open('x', 'w').close(); shutil.copy('x', TARGET)", "blocked", "writing"),
    attempt("shutil_copytree", "import os, shutil; os.mkdir('d'); shutil.copytree('d', TARGET)", "blocked", "writing"),
    attempt("mkdir_outside", "import os; os.makedirs(TARGET + '/sub')", "blocked", "writing"),
    attempt("tempfile_outside", "import tempfile; tempfile.mkstemp(dir=OUTSIDE, prefix=MARKER)", "blocked", "writing"),
    attempt("relative_dotdot", "import os; open(os.path.relpath(TARGET), 'w')", "blocked", "writing"),
    attempt("chdir_then_write", "import os; os.chdir(OUTSIDE); open(MARKER, 'w')", "blocked", "writing"),
    attempt("proc_self_root", "open('/proc/self/root' + TARGET, 'w')", "blocked", "writing"),
    attempt("proc_self_cwd_dotdot", "import os; open('/proc/self/cwd/' + os.path.relpath(TARGET), 'w')", "blocked"),
    attempt("rename_out", "import os; open('x', 'w').close(); os.rename('x', TARGET)", "blocked", "writing"),
    attempt("rename_victim_in", "import os; os.rename(VICTIM, 'mine'); open('mine', 'w')", "blocked", "writing"),
    attempt("hard_link_victim", "import os; os.link(VICTIM, 'l'); open('l', 'w').write('x')", "blocked"),
    attempt("symlink_dir", "import os; os.symlink(OUTSIDE, 'l'); open('l/' + MARKER, 'w')", "blocked", "symlink"),
    attempt("truncate_victim", "import os; os.truncate(VICTIM, 0)", "blocked", "writing"),
    attempt("utime_victim", "import os; os.utime(VICTIM, (0, 0))", "blocked", "writing"),
    attempt("mkfifo_outside", "import os; os.mkfifo(TARGET)", "blocked", "mkfifo"),
    attempt("mknod_block_device", "import os, stat; os.mknod('disk', stat.S_IFBLK | 0o600, os.makedev(8, 0))",
            "blocked", "mknod"),
    attempt("sqlite_attach", "import sqlite3; sqlite3.connect(':memory:').execute(f\"ATTACH '{TARGET}' AS x\")",
            "blocked", "sqlite3"),
    attempt("tar_member_dotdot", """
        import io, os, tarfile
        with tarfile.open('t.tar', 'w') as tar:
            info = tarfile.TarInfo(os.path.relpath(TARGET))
            tar.addfile(info, io.BytesIO(b''))
        tarfile.open('t.tar').extractall('.')
        """, "blocked"),
    attempt("dev_shm", "open('/dev/shm/' + MARKER, 'w')", "blocked", "writing"),
    attempt("shared_memory", "from multiprocessing import shared_memory; shared_memory.SharedMemory(MARKER, True, 64)",
            "blocked", "_posixshmem"),
    attempt("named_semaphore", "import multiprocessing; multiprocessing.Lock()", "blocked", "_multiprocessing"),
    attempt("proc_self_mem", "open('/proc/self/mem', 'r+b')", "blocked", "writing"),
    attempt("parent_stdout", "import os; open(f'/proc/{os.getppid()}/fd/1', 'w').write('hello')", "blocked"),
    attempt("pathlike_flip", """
        import _io
        class Flip:  # says 'inside' when checked, TARGET when used
            calls = 0
            def __fspath__(self):
                Flip.calls += 1
                return 'inside.txt' if Flip.calls == 1 else TARGET
        _io.FileIO(Flip(), 'w')
        """, "blocked", "not a str"),
    attempt("str_subclass_path", """
        class Sneaky(str):
            def startswith(self, *args):
                return True
        open(Sneaky(TARGET), 'w')
        """, "blocked", "not a str"),
    attempt("dir_fd_outside", """
        import os, posix
        d = posix.open(OUTSIDE, os.O_RDONLY)
        posix.open(MARKER, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=d)
        """, "blocked", "directory"),
    attempt("dir_fd_inside_climb", """
        import os
        # A descriptor of the sandbox dir, a deeper working directory: the path is checked from the working
        # directory, where it stays inside, but resolved from the descriptor, where it leads to TARGET.
        d = os.open('.', os.O_RDONLY)
        os.makedirs('a/b')
        escape = os.path.relpath(TARGET)
        os.chdir('a/b')
        os.open(escape, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=d)
        """, "blocked"),
    # --- reading outside the sandbox directory ------------------------------------------------------------
    attempt("read_secret", "print(open(SECRET_FILE).read())", "blocked", "reading"),
    attempt("read_secret_pathlib", "import pathlib; print(pathlib.Path(SECRET_FILE).read_text())", "blocked",
            "reading"),
    attempt("read_secret_os_read", "import os; print(os.read(os.open(SECRET_FILE, os.O_RDONLY), 100))", "blocked"),
    attempt("read_secret_open_code", "import io; print(io.open_code(SECRET_FILE).read())", "blocked", "reading"),
    attempt("read_secret_linecache", "import linecache; print(linecache.getline(SECRET_FILE, 1))", "blocked"),
    attempt("read_secret_proc_root", "print(open('/proc/self/root' + SECRET_FILE).read())", "blocked", "reading"),
    attempt("read_secret_hard_link", "import os; os.link(SECRET_FILE, 'copy'); print(open('copy').read())", "blocked"),
    attempt("list_outside", "import os; print(os.listdir(OUTSIDE))", "blocked", "reading"),
    attempt("glob_root", "import glob; print(glob.glob('/*'))", "blocked", "reading"),
    attempt("read_etc_shadow", "print(open('/etc/shadow').read())", "blocked", "reading"),
    attempt("import_planted_module", "import sys; sys.path.insert(0, OUTSIDE); import planted", "blocked", "reading"),
    attempt("parent_cmdline", "import os; print(open(f'/proc/{os.getppid()}/cmdline').read())", "blocked", "reading"),
    attempt("parent_mem", "import os; open(f'/proc/{os.getppid()}/mem', 'rb')", "blocked", "reading"),
    # The environment: run from a parent whose own environment (in /proc/<pid>/environ) holds the secret.
    attempt("os_environ", "import os; print(dict(os.environ))", "ok", helper_parent=True),
    attempt("proc_self_environ", "print(open('/proc/self/environ').read())", "blocked", "reading",
            helper_parent=True),
    attempt("parent_environ", "import os; print(open(f'/proc/{os.getppid()}/environ').read())", "blocked", "reading",
            helper_parent=True),
    # --- network --------------------------------------------------------------------------------------------
    attempt("tcp_connect", "import socket; socket.create_connection(('127.0.0.1', TCP_PORT), timeout=1)",
            "blocked", "network"),
    attempt("tcp_raw_socket", """
        import _socket
        s = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        s.connect(('127.0.0.1', TCP_PORT))
        """, "blocked", "network"),
    attempt("udp_sendto", "import socket; socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', "
            "('127.0.0.1', UDP_PORT))", "blocked", "network"),
    attempt("unix_connect", "import socket; socket.socket(socket.AF_UNIX).connect(UNIX_SOCKET)", "blocked", "network"),
    attempt("socketpair", "import socket; socket.socketpair()", "blocked", "network"),
    attempt("dns_lookup", "import socket; print(socket.gethostbyname('localhost'))", "blocked", "network"),
    attempt("urllib", "import urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{TCP_PORT}/', timeout=1)",
            "blocked", "network"),
    attempt("tcp_server", "import socketserver; socketserver.TCPServer(('0.0.0.0', 0), None)", "blocked", "network"),
    attempt("syslog", "import syslog; syslog.syslog(MARKER)", "blocked", "system log"),
    # --- processes ------------------------------------------------------------------------------------------
    attempt("subprocess_run", "import subprocess; subprocess.run(SLEEPER)", "blocked", "subprocess.Popen"),
    attempt("subprocess_fork_exec_alias", """
        import os, subprocess
        r, w = os.pipe()
        args = [a.encode() for a in SLEEPER]
        subprocess._fork_exec(args, [args[0]], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, False, False,
                              -1, None, None, None, -1, None, False)
        """, "blocked", "_fork_exec"),
    attempt("popen_class_via_subclasses", """
        def walk(cls):
            for sub in type.__subclasses__(cls):
                yield sub
                yield from walk(sub)
        Popen = next(c for c in walk(object) if c.__name__ == 'Popen' and c.__module__ == 'subprocess')
        Popen(SLEEPER)
        """, "blocked", "process creation"),
    attempt("fresh_posixsubprocess", "import _posixsubprocess", "blocked", "importing _posixsubprocess"),
    attempt("os_system", "import os; os.system(SLEEPER[2])", "blocked", "os.system"),
    attempt("os_popen", "import os; os.popen(SLEEPER[2]).read()", "blocked", "os.popen"),
    attempt("os_execv", "import os; os.execv(SLEEPER[0], SLEEPER)", "blocked", "os.execv"),
    attempt("posix_execve", "import posix; posix.execve(SLEEPER[0], SLEEPER, {})", "blocked", "os.execve"),
    attempt("memfd_exec", """
        import os
        fd = os.memfd_create('x')
        os.write(fd, b'#!/bin/sh\\nsleep 30\\n')
        os.execv(f'/proc/self/fd/{fd}', SLEEPER)
        """, "blocked", "os.execv"),
    attempt("os_fork", "import os; os.fork() or os.execv(SLEEPER[0], SLEEPER)", "blocked", "fork"),
    attempt("pty_fork", "import pty; pty.fork()", "blocked", "fork"),
    attempt("pty_spawn", "import pty; pty.spawn(SLEEPER)", "blocked"),
    attempt("posix_spawn", "import os; os.posix_spawn(SLEEPER[0], SLEEPER, {})", "blocked", "posix_spawn"),
    attempt("spawnv", "import os; os.spawnv(os.P_NOWAIT, SLEEPER[0], SLEEPER)", "blocked"),
    attempt("multiprocessing_fork", "import multiprocessing; multiprocessing.Process(target=print).start()",
            "blocked", "fork"),
    attempt("multiprocessing_spawn", "import multiprocessing as mp; mp.get_context('spawn').Process(target=print)"
            ".start()", "blocked"),
    attempt("setsid_escape_group", "import os; os.setsid()", "blocked", "os.setsid"),
    attempt("fork_bomb", """
        import os
        while True:
            try:
                os.fork()
            except Exception:
                pass
        """, "blocked", "fork"),
    # --- native code ----------------------------------------------------------------------------------------
    attempt("ctypes_libc_system", "import ctypes; ctypes.CDLL(None).system(SLEEPER[2].encode())",
            "blocked", "ctypes"),
    attempt("import_module_ctypes", "import importlib; importlib.import_module('_ctypes')", "blocked", "_ctypes"),
    attempt("ctypes_types_via_subclasses", """
        def walk(cls):
            for sub in type.__subclasses__(cls):
                yield sub
                yield from walk(sub)
        # _ctypes types would read and write raw memory with no audit event: they must not exist here.
        found = [c for c in walk(object) if c.__module__ in ('_ctypes', 'ctypes')]
        assert found, 'no ctypes types are reachable'
        """, "error", "no ctypes types are reachable"),
    attempt("extension_from_sandbox", """
        import importlib, os, shutil, sys
        # An extension module (not built into this interpreter), copied: "native code written by the program".
        names = ('math', 'select', 'array', '_struct')
        name = next(n for n in names if hasattr(importlib.import_module(n), '__file__'))
        shutil.copyfile(sys.modules[name].__file__, os.path.basename(sys.modules[name].__file__))
        del sys.modules[name]
        sys.path.insert(0, '.')
        importlib.import_module(name)
        """, "blocked", "native code"),
    attempt("extension_from_memfd", """
        import importlib.machinery, importlib.util, os, sys
        name = next(n for n in ('math', 'select', 'array', '_struct') if hasattr(sys.modules.get(n) or
                                                                               __import__(n), '__file__'))
        fd = os.memfd_create('x')
        os.write(fd, open(sys.modules[name].__file__, 'rb').read())  # any ELF the program likes
        loader = importlib.machinery.ExtensionFileLoader(name, f'/proc/self/fd/{fd}')
        loader.create_module(importlib.util.spec_from_loader(name, loader))
        """, "blocked", "native code"),
    attempt("code_object_crafting", "(lambda: 0).__code__.replace(co_code=b'\\x00' * 8)", "blocked", "code objects"),
    attempt("marshal_crafted_code", "import marshal; marshal.loads(marshal.dumps((lambda: 0).__code__))", "blocked",
            "unmarshalling"),
    attempt("marshal_after_opening_a_pyc", """
        import importlib.util, marshal, os
        pyc = importlib.util.cache_from_source(os.__file__)
        open(pyc, 'rb').read()  # the stdlib's own .pyc, opened first
        marshal.loads(marshal.dumps((lambda: 0).__code__))
        """, "blocked", "unmarshalling"),
    attempt("sourceless_pyc_import", """
        import os, py_compile, sys
        open('crafted.py', 'w').write('x = 1')
        py_compile.compile('crafted.py', cfile='crafted.pyc')  # stands for any bytecode the program makes
        os.remove('crafted.py')
        sys.path.insert(0, '.')
        import crafted
        """, "blocked", "unmarshalling"),
    # --- signals and other processes ------------------------------------------------------------------------
    attempt("kill_parent", "import os, signal; os.kill(os.getppid(), signal.SIGKILL)", "blocked", "os.kill"),
    attempt("killpg_parent", "import os, signal; os.killpg(os.getpgid(os.getppid()), signal.SIGTERM)", "blocked"),
    attempt("pidfd_kill_parent", "import os, signal; signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)",
            "blocked", "pidfd_open"),
    attempt("renice_parent", "import os; os.setpriority(os.PRIO_PROCESS, os.getppid(), 19)", "blocked",
            "setpriority"),
    attempt("pin_parent_cpu", "import os; os.sched_setaffinity(os.getppid(), {0})", "blocked", "sched_setaffinity"),
    attempt("prlimit_parent", "import os, resource; resource.prlimit(os.getppid(), resource.RLIMIT_NOFILE, (3, 3))",
            "blocked", "resource limits"),
    attempt("raise_own_limits", "import resource; resource.setrlimit(resource.RLIMIT_AS, (-1, -1))", "blocked",
            "resource limits"),
    attempt("ignore_sigxcpu", "import signal; signal.signal(signal.SIGXCPU, signal.SIG_IGN)", "blocked",
            "signal.signal"),
    attempt("block_signals_and_spin", """
        import signal
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGXCPU, signal.SIGALRM, signal.SIGTERM, signal.SIGINT})
        while True:
            pass
        """, "timeout"),
    attempt("alarm_default_action", "import signal; signal.setitimer(signal.ITIMER_REAL, 0.05)\nwhile True: pass",
            "error", "SIGALRM"),
    # --- resource exhaustion --------------------------------------------------------------------------------
    attempt("memory_bomb", "chunks = []\nwhile True:\n    chunks.append(bytearray(10 ** 6))", "memory"),
    attempt("memory_one_block", "x = b'x' * (4 * 1024 ** 3)", "memory"),
    attempt("mmap_bomb", "import mmap; mmap.mmap(-1, 4 * 1024 ** 3)", "error", "Cannot allocate memory"),
    attempt("infinite_loop", "while True:\n    pass", "timeout"),
    attempt("regex_backtracking", "import re; re.match(r'(a+)+$', 'a' * 64 + 'b')", "timeout"),
    attempt("sleep_forever", "import time; time.sleep(3600)", "timeout"),
    attempt("huge_stdout", "import sys; sys.stdout.write('x' * 50_000_000)", "ok"),
    attempt("huge_stderr", "import os\nfor _ in range(200):\n    os.write(2, b'e' * 100_000)", "ok"),
    attempt("output_flood_forever", "while True:\n    print('x' * 10_000)", "timeout"),
    attempt("close_pipes_and_spin", "import os\nfor fd in (1, 2):\n    os.close(fd)\nwhile True:\n    pass", "timeout"),
    attempt("close_report_pipe_then_escape", """
        import os
        for fd in range(3, 64):
            try:
                os.close(fd)
            except OSError:
                pass
        open(TARGET, 'w')
        """, "blocked", "report pipe"),
    attempt("deep_recursion_crash", """
        import sys
        sys.setrecursionlimit(10 ** 8)
        nested = []
        for _ in range(10 ** 6):
            nested = [nested]
        repr(nested)  # recursion in C: overflows the C stack
        """, "error"),
    attempt("thread", "import threading; threading.Thread(target=print).start()", "blocked", "thread"),
    attempt("thread_raw", "import _thread; _thread.start_new_thread(print, ())", "blocked", "start_new_thread"),
    attempt("thread_pool", "from concurrent.futures import ThreadPoolExecutor; ThreadPoolExecutor().submit(print)",
            "blocked", "thread"),
    # --- getting around the guard from inside the interpreter -----------------------------------------------
    attempt("subclasses_wrap_close_system", """
        cls = next(c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close')
        cls.__init__.__globals__['system'](SLEEPER[2])
        """, "blocked", "os.system"),
    attempt("subclasses_fileio", """
        def walk(cls):
            for sub in type.__subclasses__(cls):
                yield sub
                yield from walk(sub)
        FileIO = next(c for c in walk(().__class__.__base__) if c.__name__ == 'FileIO')
        FileIO(TARGET, 'w')
        """, "blocked", "writing"),
    attempt("fresh_posix_create_builtin", """
        import _imp, importlib.machinery
        posix = _imp.create_builtin(importlib.machinery.ModuleSpec('posix', None))
        posix.system(SLEEPER[2])
        """, "blocked", "create_builtin"),
    attempt("fresh_posix_reimport", "import sys; del sys.modules['posix']; import posix; posix.mkfifo(TARGET)",
            "blocked", "create_builtin"),
    attempt("builtin_importer", """
        from importlib.machinery import BuiltinImporter, ModuleSpec
        BuiltinImporter.create_module(ModuleSpec('_thread', BuiltinImporter)).start_new_thread(print, ())
        """, "blocked", "create_builtin"),
    attempt("reload_os", "import importlib, os; importlib.reload(os).system(SLEEPER[2])", "blocked",
            "os.system"),
    attempt("reimport_os", "import sys; del sys.modules['os']; import os; os.posix_spawn(SLEEPER[0], SLEEPER, {})",
            "blocked"),
    attempt("dunder_import", "__import__('os').execv(SLEEPER[0], SLEEPER)", "blocked", "os.execv"),
    attempt("add_audit_hook", "import sys; sys.addaudithook(lambda event, args: None)", "blocked", "audit hooks"),
    attempt("replace_sys_audit", "import sys; sys.audit = lambda *args: None; open(TARGET, 'w')", "blocked",
            "writing"),
    attempt("gc_find_hook", "import gc; [o for o in gc.get_objects() if getattr(o, '__name__', '') == 'hook']",
            "blocked", "heap"),
    attempt("gc_referrers", "import gc, sys; gc.get_referrers(sys.audit)", "blocked", "heap"),
    attempt("settrace", "import sys; sys.settrace(lambda *args: None)", "blocked", "tracing"),
    attempt("profiler_timer", "import cProfile; cProfile.Profile(timer=lambda: 0).enable()", "blocked", "tracing"),
    attempt("frame_walk_globals", """
        import sys
        frame = sys._getframe()
        while frame.f_back is not None:
            frame = frame.f_back
        g = frame.f_globals  # the sandbox's own module: neuter every helper it has
        for name, value in list(g.items()):
            if callable(value) and name.startswith('_'):
                g[name] = lambda *args, **kwargs: None
        open(TARGET, 'w')
        """, "blocked", "writing"),
    attempt("dataclass_globals", """
        cls = next(c for c in object.__subclasses__() if c.__name__ == 'ExecutionResult')
        g = cls.__init__.__globals__
        g['_DENIED_EVENTS'].clear()
        g['_READABLE_EXTRA'] = ('/',)
        print(open(SECRET_FILE).read())
        """, "blocked", "reading"),
    attempt("builtins_tampered", """
        import builtins
        builtins.isinstance = lambda *args: False
        builtins.len = lambda *args: 0
        builtins.PermissionError = KeyboardInterrupt
        open(TARGET, 'w')
        """, "blocked", "writing"),
    attempt("os_path_tampered", """
        import os, posixpath
        os.path.realpath = posixpath.realpath = lambda path, **kwargs: os.getcwd() + '/fine'
        os.path.join = posixpath.join = lambda *parts: os.getcwd() + '/fine'
        open(TARGET, 'w')
        """, "blocked", "writing"),
    attempt("signal_handler", "import signal; signal.signal(signal.SIGALRM, print)", "blocked", "signal.signal"),
]
ATTEMPT_IDS = [a.id for a in ATTEMPTS]
assert len(set(ATTEMPT_IDS)) == len(ATTEMPT_IDS)
# Run under bubblewrap as well: one or two of each kind.
BWRAP_IDS = ["open_write", "dir_fd_inside_climb", "read_secret", "parent_environ", "tcp_connect", "unix_connect",
             "subprocess_run", "ctypes_types_via_subclasses", "kill_parent", "memory_bomb", "infinite_loop",
             "huge_stdout", "fresh_posix_create_builtin", "frame_walk_globals"]  # fmt: skip


# --- the host side ---------------------------------------------------------------------------------------------


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
        }


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    outside = tmp_path_factory.mktemp("host")
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
    yield Host(outside, outside / "secret.txt", secret, outside / "victim.txt", tcp, udp, unix, unix_path,
               [e for e in environ if len(e) > 12])  # fmt: skip
    for s in (tcp, udp, unix):
        s.close()


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


def run_attempt(host: Host, attempt: Attempt, isolation: str | None = None) -> None:
    marker = f"escape-{uuid.uuid4().hex[:12]}"
    code = host.prelude(marker) + attempt.code
    env_secret = f"canary-env-{uuid.uuid4()}"
    before = host.state()
    start = time.monotonic()
    if attempt.helper_parent:
        result = run_from_helper(code, TIMEOUT, {"AWS_SECRET_ACCESS_KEY": env_secret})
    else:
        result = execute_code(code, timeout=TIMEOUT, isolation=isolation)
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


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=ATTEMPT_IDS)
def test_escape_attempt(host, attempt):
    run_attempt(host, attempt)


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="no bwrap: run scripts/system-deps.sh")
@pytest.mark.parametrize("attempt", [a for a in ATTEMPTS if a.id in BWRAP_IDS], ids=BWRAP_IDS)
def test_escape_attempt_under_bwrap(host, attempt):
    run_attempt(host, attempt, isolation="bwrap")


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
from nanochat.execution import _isolate_kernel

layers = _isolate_kernel(0, os.path.realpath(os.getcwd()))
def attempt(action):
    try:
        action()
        return "allowed"
    except OSError as e:
        return "denied"
results = {
    "read_secret": attempt(lambda: open(sys.argv[1]).read()),
    "write_outside": attempt(lambda: open(sys.argv[2], "w")),
    "write_inside": attempt(lambda: open("inside.txt", "w").write("x")),
    "read_stdlib": attempt(lambda: open(os.__file__).read(1)),
    "tcp_connect": attempt(lambda: socket.create_connection(("127.0.0.1", int(sys.argv[3])), timeout=1)),
    "mknod": attempt(lambda: os.mknod("disk", stat.S_IFBLK | 0o600, os.makedev(8, 0))),
}
print(json.dumps({"layers": layers, "results": results}))
"""


def test_kernel_layers_hold_without_the_audit_hook(host, tmp_path):
    """The kernel layers of stage 1 stop what they cover even with no Python-level check at all (as after an
    interpreter exploit). Which layers exist depends on the kernel and on privileges, so each is checked where it
    took effect; as root (CI), capabilities are always dropped."""
    target = host.outside / f"kernel-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    (tmp_path / "program.py").write_text("")  # what stage 1 finds in a real temp dir
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        done = subprocess.run([sys.executable, "-c", KERNEL_PROBE, str(host.secret_file), str(target),
                               str(listener.getsockname()[1])], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60, check=True)  # fmt: skip
        try:
            listener.accept()
            reached = True
        except BlockingIOError:
            reached = False
    probe = json.loads(done.stdout)
    layers, results = probe["layers"], probe["results"]
    created = target.exists()
    if created:
        target.unlink()
    assert results["write_inside"] == "allowed" and results["read_stdlib"] == "allowed", probe
    if "landlock" in layers:
        assert results["read_secret"] == results["write_outside"] == "denied" and not created, probe
        assert results["mknod"] == "denied", probe
    if "netns" in layers or "landlock" in layers:
        assert results["tcp_connect"] == "denied" and not reached, probe
    if os.geteuid() == 0:
        assert "no-capabilities" in layers and results["mknod"] == "denied", probe


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
