"""Escape attempts through the operating system: network, new processes, native code, signals to other
processes, and resource exhaustion.

Part of the escape suite: tests/test_sandbox_escapes.py runs every attempt here (see its docstring for how each
attempt is judged, and tests/sandbox_host.py for the names an attempt's code may use: TARGET, VICTIM, SECRET_FILE...).
"""

from __future__ import annotations

from sandbox_host import attempt

SYSTEM_ATTEMPTS = [
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
]
