"""Escape attempts on files: writing and reading outside the sandbox directory, and the parent's environment.

Part of the escape suite: tests/test_sandbox_escapes.py runs every attempt here (see its docstring for how each
attempt is judged, and tests/sandbox_host.py for the names an attempt's code may use: TARGET, VICTIM, SECRET_FILE...).
"""

from __future__ import annotations

from sandbox_host import attempt

FILE_ATTEMPTS = [
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
]
