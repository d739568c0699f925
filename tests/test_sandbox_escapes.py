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
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from sandbox_host import TIMEOUT, attempt, make_host, run_attempt

from nanochat.execution import _bwrap_problem, execute_code

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
            "error", "_posixshmem", "not available"),
    attempt("named_semaphore", "import multiprocessing; multiprocessing.Lock()", "error", "_multiprocessing"),
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
    # No audit event for socketpair itself: seccomp kills it, or the Python layer refuses the socket object.
    attempt("socketpair", "import socket; socket.socketpair()", "blocked"),
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
    attempt("fresh_posixsubprocess", "import _posixsubprocess", "error", "_posixsubprocess", "not available"),
    attempt("os_system", "import os; os.system(SLEEPER[2])", "blocked", "os.system"),
    attempt("os_popen", "import os; os.popen(SLEEPER[2]).read()", "blocked", "os.popen"),
    attempt("os_execv", "import os; os.execv(SLEEPER[0], SLEEPER)", "blocked", "os.execv"),
    attempt("posix_execve", "import posix; posix.execve(SLEEPER[0], SLEEPER, {})", "blocked", "os.execve"),
    attempt("memfd_exec", """
        import os
        fd = os.memfd_create('x')
        os.write(fd, b'#!/bin/sh\\nsleep 30\\n')
        os.execv(f'/proc/self/fd/{fd}', SLEEPER)
        """, "blocked", "memfd_create"),
    attempt("os_fork", "import os; os.fork() or os.execv(SLEEPER[0], SLEEPER)", "blocked", "fork"),
    attempt("pty_fork", "import pty; pty.fork()", "blocked", "fork"),
    attempt("pty_spawn", "import pty; pty.spawn(SLEEPER)", "blocked"),
    attempt("posix_spawn", "import os; os.posix_spawn(SLEEPER[0], SLEEPER, {})", "blocked", "posix_spawn"),
    attempt("spawnv", "import os; os.spawnv(os.P_NOWAIT, SLEEPER[0], SLEEPER)", "blocked"),
    attempt("multiprocessing_fork", "import multiprocessing; multiprocessing.Process(target=print).start()",
            "blocked", "fork"),
    attempt("multiprocessing_spawn", "import multiprocessing as mp; mp.get_context('spawn').Process(target=print)"
            ".start()", "error", "not available"),
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
            "error", "ctypes", "not available"),
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
        """, "blocked", "memfd_create"),
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
    attempt("sandbox_module_globals", """
        import os
        g = os.system.__globals__  # a guard stub: its globals are the sandbox child's own module
        g['_DENIED_EVENTS'] = ()
        g['_BLOCKED_MODULES'] = frozenset()
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
    # --- issue 16: denied by what a thing is, not by its name ----------------------------------------------
    # Standard-library extension modules loaded from their own files under other names (the check is on the file).
    attempt("alias_posixsubprocess_setsid", """
        import glob, importlib.util, os, sys
        dynload = next(p for p in sys.path if p.endswith('lib-dynload'))
        path = glob.glob(dynload + '/_posixsubprocess.*')[0]
        fresh = importlib.util.module_from_spec(importlib.util.spec_from_file_location('x._posixsubprocess', path))
        r, w = os.pipe()
        args = [a.encode() for a in SLEEPER]
        fresh.fork_exec(args, [args[0]], True, (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, False, True, -1, None,
                        None, None, -1, None, False)  # call_setsid=True: its own session
        """, "blocked", "_posixsubprocess"),
    attempt("alias_subinterpreter_os_system", """
        import glob, importlib.util, sys
        dynload = next(p for p in sys.path if p.endswith('lib-dynload'))
        path = glob.glob(dynload + '/_xxsubinterpreters.*')[0]
        interpreters = importlib.util.module_from_spec(importlib.util.spec_from_file_location('y._xxsubinterpreters',
                                                                                              path))
        interp = interpreters.create()
        interpreters.run_string(interp, f"import os; os.system({SLEEPER[2]!r})")
        """, "blocked", "_xxsubinterpreters"),
    attempt("alias_ctypes_extension_loader", """
        import glob, importlib.machinery, importlib.util, sys
        dynload = next(p for p in sys.path if p.endswith('lib-dynload'))
        loader = importlib.machinery.ExtensionFileLoader('z._ctypes', glob.glob(dynload + '/_ctypes.*')[0])
        loader.create_module(importlib.util.spec_from_loader('z._ctypes', loader))
        """, "blocked", "_ctypes"),
    attempt("alias_imp_create_dynamic", """
        import _imp, glob, importlib.machinery, sys
        dynload = next(p for p in sys.path if p.endswith('lib-dynload'))
        origin = glob.glob(dynload + '/_xxsubinterpreters.*')[0]
        _imp.create_dynamic(importlib.machinery.ModuleSpec('a.b._xxsubinterpreters', None, origin=origin))
        """, "blocked", "_xxsubinterpreters"),
    attempt("alias_ssl_read_without_audit", """
        import glob, importlib.util, sys
        dynload = next(p for p in sys.path if p.endswith('lib-dynload'))
        spec = importlib.util.spec_from_file_location('w._ssl', glob.glob(dynload + '/_ssl.*')[0])
        _ssl = importlib.util.module_from_spec(spec)
        print(_ssl._SSLContext(2).load_verify_locations(SECRET_FILE))
        """, "blocked", "_ssl"),
    attempt("plain_import_subinterpreters", "import _xxsubinterpreters as i; i.run_string(i.create(), 'print(1)')",
            "error", "not available"),
    attempt("testcapi_subinterpreter", "import _testcapi; _testcapi.run_in_subinterp('import os; os.system(\"id\")')",
            "error", "not available"),
    attempt("import_by_str_subclass", """
        class Name(str):
            def split(self, *args):
                return ['harmless']
            def partition(self, *args):
                return ('harmless', '', '')
        __import__(Name('pwd')).getpwall()
        """, "error", "not available"),
    attempt("unix_pathname_socket_raw", """
        import _socket
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.connect(UNIX_SOCKET)
        """, "blocked", "network"),
    attempt("setpgrp_escape_group", "import os; os.setpgrp()", "blocked", "setpgrp"),
    attempt("posix_setsid", "import posix; posix.setsid()", "blocked", "setsid"),
    # The audit hook's own state: a denial (or a malformed event) hands the program a frame of the hook.
    attempt("audit_event_without_arguments", "import sys; sys.audit('os.listdir')", "blocked", "cannot be checked"),
    attempt("audit_open_with_one_argument", "import sys; sys.audit('open', TARGET)", "blocked", "cannot be checked"),
    attempt("hook_frames_tampered", """
        import sys
        def noop(*args, **kwargs):
            return None
        def tamper(tb):
            touched = 0
            while tb is not None:
                frame = tb.tb_frame
                if frame.f_code.co_filename != '<program>':
                    frame.f_globals.clear()
                    for value in list(frame.f_locals.values()):
                        if isinstance(value, (set, dict, list, bytearray)):
                            value.clear()
                            touched += 1
                        for cell in getattr(value, '__closure__', None) or ():
                            cell.cell_contents = None
                            touched += 1
                        for attribute, new in (('__code__', noop.__code__), ('__defaults__', None)):
                            try:
                                setattr(value, attribute, new)
                                touched += 1
                            except Exception:
                                pass
                tb = tb.tb_next
            return touched
        for action in (lambda: sys.audit('os.listdir'), lambda: open(TARGET, 'w')):
            try:
                action()
            except Exception as e:
                print('touched', tamper(e.__traceback__))
        open(TARGET, 'w')
        print(open(SECRET_FILE).read())
        """, "blocked"),
    attempt("hook_function_defaults_replaced", """
        try:
            open(TARGET, 'w')
        except PermissionError as e:
            frame = e.__traceback__.tb_next.tb_frame  # the hook's
            check = frame.f_locals['check']
            check.__defaults__ = tuple(frozenset() if isinstance(d, frozenset) else d for d in check.__defaults__)
        open(TARGET, 'w')
        """, "blocked", "writing"),
    # Memory the address-space limit does not count, and shared memory.
    attempt("memfd_bomb", """
        import os, mmap
        fd = os.memfd_create('x')
        os.ftruncate(fd, 600 * 2 ** 20)
        mmap.mmap(fd, 600 * 2 ** 20).write(b'x' * 600 * 2 ** 20)
        """, "blocked", "memfd_create"),
    attempt("memfd_posix_copy", "import posix; posix.memfd_create('x')", "blocked", "memfd_create"),
    attempt("mmap_600m_under_256m", "import mmap; mmap.mmap(-1, 600 * 2 ** 20).write(b'x' * 600 * 2 ** 20)",
            "error", "Cannot allocate memory"),
    attempt("pipes_pin_kernel_memory", """
        import fcntl, os
        pipes = []
        while True:
            r, w = os.pipe()
            fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ: a MiB each
            os.write(w, b'x' * 65536)
            pipes.append((r, w))
        """, "error", "Too many open files"),
    attempt("dev_shm_tmpfile", "import os; os.open('/dev/shm', os.O_TMPFILE | os.O_RDWR, 0o600)", "blocked"),
    # Reads that raise no audit event: refused by module (and by Landlock/bwrap beneath).
    attempt("ssl_load_verify_locations", "import ssl; ssl.create_default_context().load_verify_locations(SECRET_FILE)",
            "error", "not available"),
    attempt("pwd_user_database", "import pwd; print(pwd.getpwall())", "error", "not available"),
    attempt("grp_group_database", "import grp; print(grp.getgrall())", "error", "not available"),
    attempt("tz_from_secret_file", "import os, time; os.environ['TZ'] = ':' + SECRET_FILE; time.tzset()", "blocked",
            "putenv"),
    # The report channel: flooded, forged or replaced before a caught violation.
    attempt("report_pipe_flooded", """
        import os, sys
        fd = int(sys.argv[2])  # the sandbox's report pipe
        os.write(fd, b'x' * 200_000)  # one huge line
        for _ in range(2000):
            os.write(fd, b'violation? no\\n' * 10)
        try:
            open(TARGET, 'w')
        except PermissionError:
            pass
        os.write(fd, b'{"outcome": "ok", "error": null}\\n' * 1000)
        """, "blocked", "writing"),
    attempt("report_pipe_half_line_swallows_prefix", """
        import os, sys
        fd = int(sys.argv[2])
        os.write(fd, b'x')  # no newline: the violation line would be glued to it
        try:
            open(TARGET, 'w')
        except PermissionError:
            pass
        os.write(fd, b'{"outcome": "ok", "error": null}')
        """, "blocked", "writing"),
    attempt("report_pipe_replaced_by_dev_null", """
        import os, sys
        os.dup2(os.open('/dev/null', os.O_WRONLY), int(sys.argv[2]))
        try:
            open(TARGET, 'w')
        except PermissionError:
            pass
        """, "blocked", "report pipe"),
    # --- review of 2026-12-07: what the issue-16 fixes still let through ----------------------------------
    # I/O that signals the parent: F_SETOWN makes the kernel send SIGIO (any signal, with F_SETSIG) to the
    # descriptor's "owner" when data arrives; no kill() is involved. Python layer alone: the parent was killed.
    attempt("fcntl_setown_signals_parent", """
        import fcntl, os, signal
        r, w = os.pipe()
        fcntl.fcntl(r, fcntl.F_SETOWN, os.getppid())
        fcntl.fcntl(r, 10, signal.SIGUSR2)  # F_SETSIG
        fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)
        os.write(w, b'x')
        """, "blocked", "fcntl"),
    attempt("fcntl_setsig_before_setown", """
        import fcntl, os, signal
        r, w = os.pipe()
        fcntl.fcntl(r, 10, signal.SIGUSR2)  # F_SETSIG first, then the owner through F_SETOWN_EX
        fcntl.fcntl(r, 15, __import__('struct').pack('ii', 1, os.getppid()))
        fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC | os.O_NONBLOCK)
        os.write(w, b'x')
        """, "blocked", "fcntl"),
    attempt("dnotify_signals_parent", """
        import fcntl, os, signal
        d = os.open('.', os.O_RDONLY)
        fcntl.fcntl(d, fcntl.F_SETOWN, -os.getpgid(os.getppid()))  # the parent's whole process group
        fcntl.fcntl(d, fcntl.F_NOTIFY, fcntl.DN_CREATE | fcntl.DN_MULTISHOT)
        open('trigger', 'w').close()
        """, "blocked", "fcntl"),
    # Pipe buffers are kernel memory that RLIMIT_AS does not count; root with CAP_SYS_RESOURCE may ask for GiBs.
    attempt("pipe_buffer_beyond_maximum", """
        import fcntl, os
        r, w = os.pipe()
        fcntl.fcntl(w, 1031, 600 * 2 ** 20)  # F_SETPIPE_SZ
        os.set_blocking(w, False)
        while True:
            os.write(w, b'x' * 2 ** 20)
        """, "blocked", "pipe buffers"),
    # Root's powers that have no audit event (the Python layer alone keeps every capability of a root parent).
    # Were they let through, the clock moves by microseconds (set to what it reads) and the niceness is this run's.
    attempt("set_host_clock", "import time; time.clock_settime(time.CLOCK_REALTIME, time.time())", "blocked",
            "clock_settime"),
    attempt("set_host_clock_ns", "import time; time.clock_settime_ns(time.CLOCK_REALTIME, time.time_ns())",
            "blocked", "clock_settime_ns"),
    attempt("negative_niceness", "import os; os.nice(-5)", "blocked", "os.nice"),
    # _socket.socketpair() makes a connected unix pair with no audit event (seccomp kills it where it runs);
    # every operation that names an address is an audited socket.* event, so the pair reaches nothing.
    attempt("raw_socketpair_then_sendto", """
        import _socket
        a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        a.sendto(b'x', UNIX_SOCKET)
        """, "blocked"),
    # At the recursion limit the hook itself cannot run: the action must still never happen (fail closed).
    attempt("hook_at_every_recursion_depth", """
        import sys
        def at_depth(n):
            if n == 0:
                try:
                    open(TARGET, 'w').write('x')
                except (RecursionError, PermissionError):
                    return
                raise SystemExit('written')
            at_depth(n - 1)
        for limit in range(30, 90):
            sys.setrecursionlimit(limit)
            for depth in range(limit - 20, limit):
                try:
                    at_depth(depth)
                except RecursionError:
                    pass
        sys.setrecursionlimit(1000)
        open(TARGET, 'w')
        """, "blocked", "writing"),
    attempt("stdout_flooded_before_violation", """
        import sys
        sys.stdout.write('y' * 20_000_000)
        try:
            open(TARGET, 'w')
        except PermissionError:
            pass
        """, "blocked", "writing"),
]
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
