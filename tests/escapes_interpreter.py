"""Escape attempts on the guard itself, from inside the interpreter (hidden references, re-imports, audit-hook
tampering), and the attempts of the later review rounds (issue 16 and the review of 2026-12-07): modules loaded
under other names, memory the limits do not count, the report channel, signals through I/O.

Part of the escape suite: tests/test_sandbox_escapes.py runs every attempt here (see its docstring for how each
attempt is judged, and tests/sandbox_host.py for the names an attempt's code may use: TARGET, VICTIM, SECRET_FILE...).
"""

from __future__ import annotations

from sandbox_host import attempt

INTERPRETER_ATTEMPTS = [
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
