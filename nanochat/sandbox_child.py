"""The sandbox's child: the script that `nanochat.execution.execute_code` runs as `python -I -S -B <this file>`.

It must be one self-contained file: it runs in a fresh interpreter with no site-packages and no `nanochat` on the
path (-I -S). It is also imported by the parent, for the protocol constants below, so its top level imports only
the standard library. The child runs this file twice, as two stages of one process (the second replaces the
first with `execv`, which keeps the pid and everything the kernel was told):

1. `--isolate`, kernel isolation, done with ctypes. Each step is skipped where the kernel or the user's privileges
   do not allow it (the parent logs which took effect), and none can be undone by the program:
   - PR_SET_PDEATHSIG: the child dies with its parent;
   - a new network namespace: nothing is reachable, not even the host's 127.0.0.1;
   - a size-limited tmpfs over the temp dir, in a mount namespace of its own: many files cannot fill the disk;
   - no capabilities: a child of root keeps uid 0 but loses root's powers, also across the exec below;
   - Landlock (Linux >= 5.13): files outside the temp dir are read-only, only the interpreter's own files are
     readable at all; no TCP; no signals to processes outside the sandbox;
   - seccomp (libseccomp): system calls nothing here needs fail with EPERM whatever calls them, native code
     included: new processes and sessions, sockets of every family, memfd_create, namespaces, ptrace and
     process_vm_*, io_uring, signals and resource limits aimed at other processes (see _SECCOMP_DENIED).
2. `--run`: a fresh interpreter that never loads ctypes (once loaded, its types read and write raw memory
   without any audit event) sets resource limits, installs the audit hook (`sys.addaudithook`, which cannot be
   removed), applies the reliability guard (dangerous functions replaced by stubs that raise), and runs the
   program.

The audit hook is policy tables (data: frozensets and tuples, below) plus small check functions. Everything it
uses is bound into the functions' default-argument tuples when it is made; the functions have no closure cells
and look up no global or builtin name (tests/test_execution.py checks their bytecode), so neither the program's
changes to modules and builtins nor a frame of the hook that it gets hold of can change what the hook decides.
Replacing a function's code or defaults is itself an audited action, and denied.
"""

from __future__ import annotations

import math
import os
import resource
import signal
import struct
import sys

# --- the protocol between parent and child (nanochat/execution.py reads these) -------------------------------
PROGRAM_FILE = "program.py"  # written into the temp dir by the parent; read and deleted by the child
PROGRAM_NAME = "<program>"  # the file name shown in tracebacks
STARTED = "started "  # report line: the program's clock starts; followed by the active kernel layers
VIOLATION = "violation "  # report lines starting with this name a denied action
EXIT_REPORT_CLOSED = 70  # the child's exit code when a denied action cannot be reported: the pipe was replaced
TEMP_DIR_BYTES = 64 * 1024 * 1024  # all files together, where the temp dir can be a tmpfs of its own
MAX_FILE_BYTES = 16 * 1024 * 1024  # RLIMIT_FSIZE: the temp dir may live on a RAM-backed /tmp
KERNEL_LAYERS = ("netns", "tmpfs", "no-capabilities", "landlock", "seccomp")  # what stage 1 may report
NO_KERNEL_LAYERS = "python-only"  # stage 1's argument that skips them all (tests only: nanochat/execution.py)
_MAX_OPEN_FILES = 64
_MAX_VIOLATION_CHARS = 1000  # a violation line stays far below PIPE_BUF, so it is written in one piece


# ---------------------------------------------------------------------------------------------------------
# Stage 1 (--isolate): kernel isolation through ctypes, then exec stage 2.

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET, _CLONE_THREAD = 0x00020000, 0x10000000, 0x40000000, 0x00010000
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

# seccomp, through libseccomp (the library container runtimes use): it resolves names to each architecture's
# numbers (x86_64 and aarch64 differ), and kills a process that calls in through another ABI (i386, x32).
# A denied call kills the process with SIGSYS, which the parent reports as a sandbox violation: the audit hook
# refuses all of these first, so only native code (an interpreter bug) gets here, and it must not go on. Names
# unknown on this architecture are skipped (fork and vfork do not exist on aarch64, where clone covers them).
_SECCOMP_DENIED = (
    # new processes and sessions: every descendant would outlive the sandbox's process-group kill
    "fork", "vfork", "setsid", "setpgid",
    # anything network, unix sockets (pathname or abstract) included; io_uring would bypass this filter
    "socket", "socketpair", "io_uring_setup", "io_uring_enter", "io_uring_register",
    # memory the address-space limit does not count; namespaces; other processes' memory and signals
    "memfd_create", "memfd_secret", "unshare", "setns", "ptrace", "process_vm_readv", "process_vm_writev",
    "process_madvise", "kcmp", "pidfd_open", "pidfd_getfd", "pidfd_send_signal", "tkill", "setpriority",
    "ioprio_set", "move_pages", "migrate_pages",
    # kernel features nothing here needs
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key", "mount", "umount2", "pivot_root",
    "chroot", "open_by_handle_at", "name_to_handle_at", "fanotify_init", "fsopen", "fsmount", "fspick",
    "open_tree", "move_mount", "mount_setattr", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "acct", "quotactl", "syslog", "uselib", "personality",
)  # fmt: skip
_SCMP_ACT_ALLOW, _SCMP_ACT_KILL_PROCESS, _SCMP_ACT_ERRNO_ENOSYS = 0x7FFF0000, 0x80000000, 0x00050000 | 38
_SCMP_CMP_NE, _SCMP_CMP_EQ, _SCMP_CMP_GT, _SCMP_CMP_MASKED_EQ = 1, 4, 6, 7
# fcntl/ioctl commands that make I/O on a descriptor signal a process of the caller's choosing (SIGIO, or any
# signal with F_SETSIG, sent to the "owner" even when it is the parent: no kill() is involved), and pipe buffers
# beyond the unprivileged maximum (kernel memory that RLIMIT_AS does not count; root may ask for gigabytes).
_F_SETOWN, _F_SETSIG, _F_SETOWN_EX, _F_SETPIPE_SZ = 8, 10, 15, 1031
_FIOSETOWN, _SIOCSPGRP, _TIOCSPGRP = 0x8901, 0x8902, 0x5410
_MAX_PIPE_BYTES = 1 << 20  # /proc/sys/fs/pipe-max-size's default


def _isolate_main(argv: list[str]) -> None:
    report_fd, parent_pid, mode = int(argv[0]), int(argv[3]), argv[4]
    sandbox_dir = os.path.realpath(os.getcwd())
    layers = _isolate_kernel(parent_pid, sandbox_dir, mode != NO_KERNEL_LAYERS)
    stage2 = [sys.executable, "-I", "-S", "-B", os.path.abspath(__file__), "--run", *argv[:4], ",".join(layers)]
    try:
        os.execv(sys.executable, stage2)
    except OSError as e:  # e.g. Landlock refused a file the interpreter needs: fail closed, and say why
        import json

        error = f"sandbox: cannot start the sandboxed interpreter ({e}); kernel layers: {layers}"
        os.write(report_fd, json.dumps({"outcome": "error", "error": error}).encode() + b"\n")
        os._exit(1)


def _isolate_kernel(parent_pid: int, sandbox_dir: str, kernel_layers: bool = True) -> list[str]:
    """Kernel isolation of this process (kept across exec); returns the layers that took effect."""
    if not sys.platform.startswith("linux"):
        return []  # every layer below is Linux's; elsewhere only the Python-level checks hold
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    except (ImportError, OSError):
        return []
    libc.syscall.restype = ctypes.c_long
    # Die with the parent thread (e.g. a crashed worker) instead of lingering; stop if it is already gone.
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent_pid and os.getppid() != parent_pid:
        os._exit(1)
    if not kernel_layers:
        return []
    layers = []
    if _unshare_network(libc):
        layers.append("netns")
    if _mount_private_temp_dir(libc, sandbox_dir):
        layers.append("tmpfs")
    # No new privileges: exec can never grant any (setuid, file capabilities); Landlock and seccomp require it.
    libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if _drop_capabilities(ctypes, libc):  # before Landlock, which hides /proc
        layers.append("no-capabilities")
    if _restrict_with_landlock(ctypes, libc, sandbox_dir):
        layers.append("landlock")
    if _install_seccomp(ctypes):  # last: the steps above need unshare and mount
        layers.append("seccomp")
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
    with open(PROGRAM_FILE, "rb") as f:
        program = f.read()
    if libc.unshare(_CLONE_NEWNS) != 0:
        return False
    # Make every mount private first, so that the tmpfs below never propagates to the host's namespace.
    if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
        return False
    options = f"size={TEMP_DIR_BYTES},nr_inodes=4096,mode=0700,uid={os.getuid()},gid={os.getgid()}"
    if libc.mount(b"tmpfs", sandbox_dir.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode()) != 0:
        return False
    os.chdir(sandbox_dir)  # the working directory still was the directory underneath the new mount
    with open(os.open(PROGRAM_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
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


def _install_seccomp(ctypes) -> bool:
    """Load the seccomp filter (see _SECCOMP_DENIED); False where libseccomp or the kernel's seccomp is missing."""
    try:
        lib = ctypes.CDLL("libseccomp.so.2")
    except OSError:
        return False
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.c_void_p]  # fmt: skip
    lib.seccomp_load.argtypes = lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    me = os.getpid()  # kept by the exec into stage 2
    # (syscall, conditions): denied when every condition holds; a condition is (argument, comparison, a, b).
    rules = [(name, ()) for name in _SECCOMP_DENIED if name != "clone3"]
    rules += [
        ("clone", ((0, _SCMP_CMP_MASKED_EQ, _CLONE_THREAD, 0),)),  # a new process, not a thread
        ("kill", ((0, _SCMP_CMP_NE, me, 0),)),  # signals: only to this process itself
        ("tgkill", ((0, _SCMP_CMP_NE, me, 0),)),
        ("rt_sigqueueinfo", ((0, _SCMP_CMP_NE, me, 0),)),
        ("rt_tgsigqueueinfo", ((0, _SCMP_CMP_NE, me, 0),)),
        ("prlimit64", ((0, _SCMP_CMP_NE, 0, 0), (2, _SCMP_CMP_NE, 0, 0))),  # setting another process's limits
        ("sched_setaffinity", ((0, _SCMP_CMP_NE, 0, 0),)),
        ("sched_setscheduler", ((0, _SCMP_CMP_NE, 0, 0),)),
        ("sched_setparam", ((0, _SCMP_CMP_NE, 0, 0),)),
        ("sched_setattr", ((0, _SCMP_CMP_NE, 0, 0),)),
        ("prctl", ((0, _SCMP_CMP_EQ, _PR_SET_PDEATHSIG, 0),)),  # it must keep dying with its parent
        ("fcntl", ((1, _SCMP_CMP_EQ, _F_SETOWN, 0),)),  # signals to another process, by way of I/O
        ("fcntl", ((1, _SCMP_CMP_EQ, _F_SETOWN_EX, 0),)),
        ("fcntl", ((1, _SCMP_CMP_EQ, _F_SETSIG, 0),)),
        ("fcntl", ((1, _SCMP_CMP_EQ, _F_SETPIPE_SZ, 0), (2, _SCMP_CMP_GT, _MAX_PIPE_BYTES, 0))),
        ("ioctl", ((1, _SCMP_CMP_EQ, _FIOSETOWN, 0),)),
        ("ioctl", ((1, _SCMP_CMP_EQ, _SIOCSPGRP, 0),)),
        ("ioctl", ((1, _SCMP_CMP_EQ, _TIOCSPGRP, 0),)),
    ]
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        return False
    try:
        # clone3 passes its flags in memory, out of the filter's sight: "not implemented" makes libc use clone.
        number = lib.seccomp_syscall_resolve_name(b"clone3")
        if number >= 0 and lib.seccomp_rule_add_array(ctx, _SCMP_ACT_ERRNO_ENOSYS, number, 0, None) != 0:
            return False
        for name, conditions in rules:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # not on this architecture
            packed = b"".join(struct.pack("=IIQQ", arg, op, a & (2**64 - 1), b) for arg, op, a, b in conditions)
            array = ctypes.create_string_buffer(packed, max(1, len(packed)))
            if lib.seccomp_rule_add_array(ctx, _SCMP_ACT_KILL_PROCESS, number, len(conditions), array) != 0:
                return False  # a rule this libseccomp cannot express: load nothing rather than half a filter
        return lib.seccomp_load(ctx) == 0
    finally:
        lib.seccomp_release(ctx)


# ---------------------------------------------------------------------------------------------------------
# Stage 2 (--run): limits, audit hook, reliability guard, the program.
#
# The audit hook's policy, as data. Audit events that are always denied, with the reason shown to the user.
_DENIED_EVENTS = (
    ("os.system", "process creation"),
    ("os.exec", "process creation"),
    ("os.spawn", "process creation"),
    ("os.posix_spawn", "process creation"),
    ("os.fork", "process creation"),
    ("os.forkpty", "process creation"),
    ("subprocess.Popen", "process creation"),
    ("pty.spawn", "process creation"),
    ("os.kill", "signalling processes"),
    ("os.killpg", "signalling processes"),
    ("signal.pthread_kill", "signalling processes"),
    ("shutil.rmtree", "recursive deletion"),
    ("os.symlink", "creating symlinks"),  # also keeps every path inside the temp dir free of symlinks
    ("os.chmod", "changing permissions"),  # also keeps the temp dir removable by a non-root parent
    ("os.chown", "changing ownership"),
    ("resource.setrlimit", "changing resource limits"),
    ("resource.prlimit", "changing resource limits"),
    ("gc.get_objects", "heap introspection"),
    ("gc.get_referrers", "heap introspection"),
    ("gc.get_referents", "heap introspection"),
    ("sqlite3.enable_load_extension", "loading native code"),
    ("sqlite3.load_extension", "loading native code"),
    # ATTACH DATABASE writes any file, and no audit event reports it.
    ("sqlite3.connect", "sqlite3 (ATTACH DATABASE allows writing files anywhere)"),
    # A hook, trace or profile function added by the program would run its code in the middle of the checks
    # (between a check and the checked call).
    ("sys.addaudithook", "adding audit hooks"),
    ("sys.settrace", "tracing"),
    ("sys.setprofile", "tracing"),
    ("sys.monitoring.register_callback", "tracing"),  # Python >= 3.12
    ("_thread.start_new_thread", "starting threads"),  # Python >= 3.13; the guard stubs the function before that
    ("code.__new__", "creating code objects"),  # hand-made bytecode can read and write arbitrary memory
    ("fcntl.ioctl", "ioctl"),  # device and filesystem controls: nothing a program here needs
    # A subinterpreter starts with no audit hook at all, whichever module or C function creates it.
    ("cpython.PyInterpreterState_New", "starting subinterpreters"),
    ("cpython.run_interactivehook", "the interactive hook"),
)
_DENIED_EVENT_PREFIXES = (
    ("socket.", "network access"),
    ("ctypes.", "native code (ctypes)"),
    ("syslog.", "the system log"),  # /dev/log is a unix socket, outside any network namespace
    ("_posixsubprocess.", "process creation"),  # Python >= 3.13 audits fork_exec itself
)
# Attributes whose change is an audited "object.__setattr__" on a function: a changed __code__ or default
# tuple would change what one of the hook's own functions does (see _HOOK_FUNCTIONS).
_FROZEN_FUNCTION_ATTRIBUTES = frozenset({"__code__", "__defaults__", "__kwdefaults__"})
# Audit events that modify a path: event -> indices of the path arguments.
_WRITE_EVENTS = (
    ("os.remove", (0,)),
    ("os.rmdir", (0,)),
    ("os.mkdir", (0,)),
    ("os.utime", (0,)),
    ("os.rename", (0, 1)),
    ("os.link", (0, 1)),
    ("os.truncate", (0,)),
    ("os.setxattr", (0,)),
    ("os.removexattr", (0,)),
    ("os.chflags", (0,)),
    ("os.lchflags", (0,)),
)
# fcntl commands a program may use (fcntl.fcntl's audit event): descriptor flags, duplication, locks, pipe sizes
# up to the unprivileged maximum, seals. Anything else is refused, F_SETOWN/F_SETOWN_EX/F_SETSIG above all: with
# them, I/O on a descriptor (or a directory change, F_NOTIFY) signals a process of the program's choosing, the
# parent included, without any kill().
_FCNTL_ALLOWED = frozenset({0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 16, 36, 37, 38, 1025, 1030, 1031, 1032, 1033, 1034, 1035,
                            1037})  # fmt: skip
# Audit events that read a path (or list a directory): event -> index of the path argument.
_READ_EVENTS = (("os.listdir", 0), ("os.scandir", 0), ("os.getxattr", 0), ("os.listxattr", 0))
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
# Readable besides the temp dir and the standard library: devices and data that the stdlib itself reads.
_READABLE_EXTRA = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/usr/share/zoneinfo")
_DISABLED_EVENT = "nanochat.sandbox.disabled"  # raised by the guard's stubs, so the hook reports them too

# Modules that may not be loaded under any name: native code, process spawning, subinterpreters (which would
# not inherit the audit hook), files in /dev/shm (shared memory, named semaphores), C code that reads files or
# the user database without audit events (ssl's load_verify_locations, pwd, grp, curses' terminfo), and the
# modules the original guard poisoned. The hook refuses any dotted name with one of these parts, and any
# extension module whose file is one of theirs, whatever name it is loaded as.
_BLOCKED_MODULES = frozenset({
    "ctypes", "_ctypes", "_ctypes_test", "_posixsubprocess", "_xxsubinterpreters", "_xxinterpchannels",
    "_interpreters", "_interpchannels", "_interpqueues", "_testcapi", "_testinternalcapi", "_testmultiphase",
    "_testsinglephase", "_testbuffer", "_testimportmultiple", "_testclinic", "_xxtestfuzz", "_posixshmem",
    "_multiprocessing", "spwd", "nis", "ossaudiodev", "_dbm", "_gdbm", "readline", "_tkinter", "tkinter",
    "_ssl", "pwd", "grp", "_crypt", "_curses", "_curses_panel", "psutil", "ipdb", "joblib",
})  # fmt: skip

# The reliability guard: functions replaced by raising stubs (module -> names). Unlike the original guard, the
# path operations that the audit hook checks (remove, unlink, rename, replace, rmdir, truncate, link) stay
# available inside the temp dir: tempfile, for one, needs to delete its own files. The os names are also
# replaced in `posix`, which holds the same functions; a second copy of a built-in module cannot be made
# (_imp.create_builtin), and a second copy of an extension module is refused by its file (see above).
_DISABLED_FUNCTIONS = {
    "os": (
        "system", "popen", "kill", "killpg", "fork", "forkpty", "execv", "execve", "execl", "execle",
        "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
        "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "pidfd_open", "chmod", "fchmod",
        "lchmod", "chown", "fchown", "lchown", "chroot", "mknod", "mkfifo", "symlink", "putenv", "unsetenv",
        "setuid", "setgid", "seteuid", "setegid", "setreuid", "setregid", "setresuid", "setresgid", "setsid",
        "setpgid", "setpgrp", "_exit", "abort", "setpriority", "sched_setscheduler", "sched_setparam",
        "sched_setaffinity", "unshare", "setns", "memfd_create", "eventfd", "login_tty",
        "nice",  # as root (CAP_SYS_NICE): a negative niceness starves the host's processes for the whole run
    ),
    # As root (CAP_SYS_TIME) these set the host's clock, with no audit event; where the kernel layers run, no
    # capabilities are left, but the Python layer must hold on its own (non-Linux, or no capset).
    "time": ("clock_settime", "clock_settime_ns"),
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
    report_pipe = (os.fstat(report_fd).st_dev, os.fstat(report_fd).st_ino)
    with open(PROGRAM_FILE, encoding="utf-8", errors="surrogatepass") as f:
        source = f.read()
    os.remove(PROGRAM_FILE)
    sandbox_dir = os.path.realpath(os.getcwd())

    _set_limits(memory_bytes, timeout)
    _preload_builtins()
    # This file too: tracebacks through the guard's wrappers show its lines.
    readable = (sandbox_dir, *_stdlib_dirs(), os.path.realpath(__file__), *_READABLE_EXTRA)
    sys.addaudithook(_make_audit_hook(sandbox_dir, readable, report_fd, exit_now))
    _reliability_guard(subprocess)

    # The parent's wall clock for the program starts now; it logs the kernel layers once.
    os.write(report_fd, f"{STARTED}{argv[4]}\n".encode())
    outcome, error = _run_program(source)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # the program may have closed or replaced it
            pass
    # The verdict goes last, on a line of its own, and only into the pipe the sandbox was given.
    if (os.fstat(report_fd).st_dev, os.fstat(report_fd).st_ino) != report_pipe:
        exit_now(EXIT_REPORT_CLOSED)
    os.write(report_fd, b"\n" + json.dumps({"outcome": outcome, "error": error}).encode() + b"\n")
    exit_now(0)  # skip interpreter teardown and any atexit handlers the program registered


def _set_limits(memory_bytes: int, timeout: float) -> None:
    if memory_bytes:
        _lower_limit(resource.RLIMIT_AS, memory_bytes)
        _lower_limit(resource.RLIMIT_DATA, memory_bytes)
    _lower_limit(resource.RLIMIT_FSIZE, MAX_FILE_BYTES)  # larger writes fail with EFBIG (SIGXFSZ is ignored)
    # SIGXCPU (reported as a timeout) if the wall clock somehow fails; the hard limit's SIGKILL comes later.
    cpu_seconds = math.ceil(timeout) + 1
    _lower_limit(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)
    _lower_limit(resource.RLIMIT_CORE, 0)
    # Few descriptors: each pipe can pin up to a MiB of kernel memory that the address-space limit does not see.
    _lower_limit(resource.RLIMIT_NOFILE, _MAX_OPEN_FILES)
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


def _blocked_extension_files(directories) -> frozenset[str]:
    """The real paths of the blocked modules' extension files (e.g. lib-dynload/_posixsubprocess.*.so)."""
    import importlib.machinery

    found = set()
    for directory in directories:
        for name in os.listdir(directory):
            for suffix in importlib.machinery.EXTENSION_SUFFIXES:
                if name.endswith(suffix) and name[: -len(suffix)] in _BLOCKED_MODULES:
                    found.add(os.path.realpath(os.path.join(directory, name)))
    return frozenset(found)


# --- the audit hook: small checks over the tables above ------------------------------------------------------
#
# Each function below names everything it uses as a parameter with a default; _bind fills those defaults when the
# hook is made, and gives the functions globals in which no name resolves. A check returns the reason for a
# denial (or None); only _hook raises, after every check has returned, so the denial carries one frame of ours.


def _hook(event, args, check=None, report=None, gc_isenabled=None, gc_disable=None, gc_enable=None, type_=None,
          str_=None, tuple_=None, base_exception=None, denied=None, unavailable=None):  # fmt: skip
    # Only sys.audit() called by the program can pass other types: such an event does nothing by itself.
    if type_(event) is not str_ or type_(args) is not tuple_:
        return
    # A garbage collection during the checks could run the program's __del__ methods in the middle.
    gc_was_enabled = gc_isenabled()
    gc_disable()
    try:
        reason = check(event, args)
    except base_exception:  # e.g. sys.audit('os.listdir') with no arguments: deny, and keep our frames in
        reason = "an audit event whose arguments cannot be checked is disabled (" + event[:100] + ")"
    if gc_was_enabled:
        gc_enable()
    if reason is None:
        return
    if type_(reason) is tuple_:  # a module that does not exist here: `try: import x except ImportError` works
        raise unavailable("sandbox: " + reason[0])
    report(reason)
    raise denied("sandbox: " + reason)


def _report(reason, fd=None, pipe=None, fstat=None, write=None, exit_now=None, exit_code=None, prefix=None,
            limit=None, os_error=None):  # fmt: skip
    """Tell the parent at once, so that a program that catches the denial still fails. If the report pipe is
    not the one the sandbox was given (closed, or another file put in its place with dup2), stop here. The line
    starts with a newline: the program may have left half a line in the pipe to swallow the prefix."""
    text = ("sandbox: " + reason)[:limit].replace("\n", " ").encode("utf-8", "backslashreplace")
    line = b"\n" + prefix + text + b"\n"
    try:
        status = fstat(fd)
        if (status.st_dev, status.st_ino) != pipe:
            exit_now(exit_code)
        write(fd, line)
    except os_error:
        exit_now(exit_code)


def _check(event, args, denied_events=None, denied_names=None, prefixes=None, writes=None, write_names=None, reads=None,
           read_names=None, frozen_attributes=None, disabled_event=None, check_open=None, check_path=None,
           check_import=None, check_unmarshal=None, check_fcntl=None, lookup=None, type_=None, str_=None, int_=None,
           len_=None, function_type=None, own_code=None):  # fmt: skip
    if event in denied_names:
        return lookup(denied_events, event) + " is disabled (" + event + ")"
    for prefix, reason in prefixes:
        if event.startswith(prefix):
            return reason + " is disabled (" + event + ")"
    if event == disabled_event:
        return (args[0] if type_(args[0]) is str_ else "this function") + " is disabled"
    if event == "open":
        return check_open(args[0], args[1], args[2])
    if event == "marshal.loads" or event == "marshal.load":
        return check_unmarshal(event, args)
    if event == "fcntl.fcntl":
        return check_fcntl(args[1], args[2])
    if event in write_names:
        for index in lookup(writes, event):
            reason = check_path(event, args[index], True)
            if reason is not None:
                return reason
        return None
    if event in read_names:
        path = args[lookup(reads, event)]
        if path is None:  # the working directory, which may have been changed to anywhere
            path = "."
        if type_(path) is int_:  # a descriptor: of a directory inside the sandbox (see _check_open)
            return None
        return check_path(event, path, False)
    if event == "import":
        return check_import(args[0], args[1])
    if event == "object.__setattr__" and type_(args[0]) is function_type and args[1] in frozen_attributes:
        if args[0].__code__ in own_code:
            return "changing the sandbox's own functions is disabled (" + args[1] + ")"
    return None


def _lookup(pairs, key):
    for name, value in pairs:
        if name == key:
            return value
    return None


def _text_of(path, type_=None, str_=None, bytes_=None, encoding=None):
    """A str or bytes path as text; None for anything else (path-like objects, str subclasses)."""
    if type_(path) is str_:
        return path
    if type_(path) is bytes_:
        return path.decode(encoding, "surrogateescape")
    return None


def _resolve(text, getcwd=None, lstat=None, readlink=None, is_link=None, os_error=None):
    """The real path that `text` names: symlinks followed, as the kernel would; None if unresolvable."""
    if not text.startswith("/"):
        try:
            text = getcwd() + "/" + text
        except os_error:
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
        except os_error:  # missing (about to be created) or unreadable: the kernel will decide
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
        except os_error:
            return None
        if target.startswith("/"):
            resolved = ""
        target_names = target.split("/")
        target_names.reverse()
        pending += target_names
    return resolved or "/"


def _under(real, roots):
    for root in roots:
        if real == root or real.startswith(root + "/"):
            return True
    return False


def _climbs(text):
    """Whether a relative path goes above the directory it starts from. The program may hold descriptors of
    directories inside the temp dir, and calls such as os.open(dir_fd=) resolve relative paths from those,
    which the audit event does not say: a path that never climbs stays below any of them."""
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


def _check_path(event, path, writing, text_of=None, resolve=None, under=None, climbs=None, sandbox=None,
                readable=None, repr_=None):  # fmt: skip
    text = text_of(path)
    if text is None:
        return event + " with a path that is not a str or bytes is disabled; pass str(path)"
    real = resolve(text)
    shown = repr_(text[:300])
    if real is None:
        return event + " of a path that cannot be resolved is disabled (" + shown + ")"
    if writing and not under(real, sandbox) and real != "/dev/null":
        return "writing outside the sandbox directory is disabled (" + event + " " + shown + ")"
    if not writing and not under(real, readable):
        where = "outside the sandbox directory and the standard library"
        return "reading " + where + " is disabled (" + event + " " + shown + ")"
    if climbs(text):
        return "relative paths that climb above their start are disabled (" + event + " " + shown + ")"
    return None


def _check_open(path, mode, flags, text_of=None, resolve=None, under=None, check_path=None, sandbox=None,
                stat=None, is_dir=None, write_flags=None, type_=None, str_=None, int_=None, bool_=None, repr_=None,
                os_error=None):  # fmt: skip
    if type_(path) is int_ or type_(path) is bool_:
        return None  # an already-open descriptor: wrapping it grants no new access
    # os.open and io.FileIO report flags; C code opening with fopen() reports only a mode ("a", "rb").
    writing = type_(flags) is not int_ or bool_(flags & write_flags)
    if type_(mode) is str_ and ("w" in mode or "a" in mode or "x" in mode or "+" in mode):
        writing = True
    text = text_of(path)
    real = resolve(text) if text is not None else None
    if real is not None and not under(real, sandbox):
        try:
            directory = is_dir(stat(real).st_mode)
        except os_error:
            directory = False
        if directory:  # relative paths from its descriptor would escape all the checks
            return "opening a directory outside the sandbox directory is disabled: it allows writing outside it (" \
                + repr_(text[:300]) + ")"  # fmt: skip
    return check_path("open", path, writing)


def _check_import(name, filename, blocked_names=None, blocked_files=None, text_of=None, resolve=None, under=None,
                  sandbox=None, readable=None, type_=None, str_=None, repr_=None):  # fmt: skip
    if filename is None:  # finding a module by name (and then Python source, or a built-in module)
        if type_(name) is not str_:  # a str subclass could answer split() as it likes
            return ("modules named by a str subclass are not available in the sandbox",)
        for part in name.split("."):
            if part in blocked_names:
                return ("module " + repr_(name[:200]) + " is not available in the sandbox",)
        return None
    # An extension module: native code, only the standard library's, never a blocked one under another name.
    text = text_of(filename)
    real = resolve(text) if text is not None else None
    if real is None or under(real, sandbox) or not under(real, readable):
        return "loading native code from outside the standard library is disabled (" + repr_(text) + ")"
    if real in blocked_files or (type_(name) is str_ and name.rpartition(".")[2] in blocked_names):
        shown = repr_(name[:200]) if type_(name) is str_ else "another name"
        return "loading " + real.rpartition("/")[2] + " is disabled (as " + shown + ")"
    return None


def _check_fcntl(command, argument, fcntl_allowed=None, set_pipe_size=None, max_pipe_bytes=None, type_=None,
                 int_=None, repr_=None):  # fmt: skip
    if type_(command) is not int_ or command not in fcntl_allowed:
        shown = repr_(command) if type_(command) is int_ else "?"
        return "fcntl command " + shown + " is disabled (F_SETOWN and F_SETSIG would let I/O signal other processes)"
    if command == set_pipe_size and (type_(argument) is not int_ or argument > max_pipe_bytes):
        return "pipe buffers over 1 MiB are disabled (kernel memory that the memory limit does not count)"
    return None


def _check_unmarshal(event, args, getframe=None, compile_bytecode=None, text_of=None, resolve=None, under=None,
                     stdlib=None, open_=None, read=None, close=None, read_only=None, type_=None, bytes_=None,
                     len_=None, buffers=None):  # fmt: skip
    """Unmarshalling is allowed only for the import system loading one of the standard library's .pyc files:
    the caller must be importlib's own _compile_bytecode, its bytecode_path a .pyc in the standard library, and
    the data that file's content. Any other code object could be hand-made bytecode, which reads and writes
    arbitrary memory. Checked from the caller's frame, so the hook keeps no state between events."""
    denial = "unmarshalling code objects is disabled (" + event + ")"
    if event != "marshal.loads" or len_(args) != 1 or type_(args[0]) not in buffers:
        return denial
    caller = getframe(3)  # 0: this function, 1: _check, 2: _hook, 3: whoever called marshal.loads
    if caller.f_code is not compile_bytecode:
        return denial
    text = text_of(caller.f_locals.get("bytecode_path"))
    real = resolve(text) if text is not None else None
    if real is None or not real.endswith(".pyc") or not under(real, stdlib):
        return denial
    fd = open_(real, read_only)  # raises "open" again: a readable file, allowed
    try:
        chunks = []
        while True:
            chunk = read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        close(fd)
    if b"".join(chunks)[16:] != bytes_(args[0]):  # after the 16-byte header (magic, flags, source stamp)
        return denial
    return None


_HOOK_FUNCTIONS = (_hook, _report, _check, _lookup, _text_of, _resolve, _under, _climbs, _check_path, _check_open,
                   _check_import, _check_unmarshal, _check_fcntl)  # fmt: skip


def _bind(function, values: dict):
    """A copy of `function` whose parameters after the first `required` take their values from `values`, and
    whose globals resolve no name (not even a builtin's): it can only use what it was given."""
    import types

    code = function.__code__
    names = code.co_varnames[: code.co_argcount]
    required = code.co_argcount - len(function.__defaults__ or ())
    defaults = tuple(values[name] for name in names[required:])
    return types.FunctionType(code, {"__builtins__": {}}, function.__name__, defaults)


def _make_audit_hook(sandbox_dir: str, readable: tuple[str, ...], report_fd: int, exit_now):
    """Bind the checks above to this run's values; returns the hook. Values are immutable (str, int, tuples,
    frozensets) or functions: C functions, and the bound checks, whose code and defaults cannot be replaced."""
    import _stat
    import gc
    import importlib._bootstrap_external
    import posix

    stdlib = tuple(_stdlib_dirs())
    report_pipe = posix.fstat(report_fd)
    v = {
        "type_": type, "str_": str, "bytes_": bytes, "int_": int, "bool_": bool, "tuple_": tuple, "len_": len,
        "repr_": repr, "os_error": OSError, "base_exception": BaseException, "denied": PermissionError,
        "unavailable": ModuleNotFoundError, "function_type": type(_bind), "buffers": (bytes, bytearray, memoryview),
        "encoding": sys.getfilesystemencoding(),
        "getcwd": posix.getcwd, "lstat": posix.lstat, "stat": posix.stat, "fstat": posix.fstat,
        "readlink": posix.readlink, "write": posix.write, "open_": posix.open, "read": posix.read,
        "close": posix.close, "read_only": posix.O_RDONLY, "is_link": _stat.S_ISLNK, "is_dir": _stat.S_ISDIR,
        "gc_isenabled": gc.isenabled, "gc_disable": gc.disable, "gc_enable": gc.enable, "getframe": sys._getframe,
        "compile_bytecode": importlib._bootstrap_external._compile_bytecode.__code__,
        "sandbox": (sandbox_dir,), "readable": readable, "stdlib": stdlib, "write_flags": _WRITE_FLAGS,
        "fd": report_fd, "pipe": (report_pipe.st_dev, report_pipe.st_ino), "exit_now": exit_now,
        "exit_code": EXIT_REPORT_CLOSED, "prefix": VIOLATION.encode(), "limit": _MAX_VIOLATION_CHARS,
        "denied_names": frozenset(name for name, _ in _DENIED_EVENTS), "prefixes": _DENIED_EVENT_PREFIXES,
        "writes": _WRITE_EVENTS, "write_names": frozenset(name for name, _ in _WRITE_EVENTS),
        "reads": _READ_EVENTS, "read_names": frozenset(name for name, _ in _READ_EVENTS),
        "frozen_attributes": _FROZEN_FUNCTION_ATTRIBUTES, "disabled_event": _DISABLED_EVENT,
        "blocked_names": _BLOCKED_MODULES, "fcntl_allowed": _FCNTL_ALLOWED, "set_pipe_size": _F_SETPIPE_SZ,
        "max_pipe_bytes": _MAX_PIPE_BYTES, "blocked_files": _blocked_extension_files(stdlib),
    }  # fmt: skip
    v["denied_events"] = _DENIED_EVENTS
    v["own_code"] = frozenset(function.__code__ for function in _HOOK_FUNCTIONS)
    v["lookup"], v["under"], v["climbs"] = _bind(_lookup, v), _bind(_under, v), _bind(_climbs, v)
    v["text_of"] = _bind(_text_of, v)
    v["resolve"] = _bind(_resolve, v)
    v["check_path"] = _bind(_check_path, v)
    v["check_open"] = _bind(_check_open, v)
    v["check_import"] = _bind(_check_import, v)
    v["check_unmarshal"] = _bind(_check_unmarshal, v)
    v["check_fcntl"] = _bind(_check_fcntl, v)
    v["check"] = _bind(_check, v)
    v["report"] = _bind(_report, v)
    return _bind(_hook, v)


def _reliability_guard(subprocess) -> None:
    """Replace dangerous functions by stubs that raise, and drop cached modules that must not be reused."""
    import _imp
    import _signal
    import _thread
    import builtins
    import io
    import posix
    import threading
    import time

    modules = {"os": os, "subprocess": subprocess, "time": time, "_thread": _thread, "threading": threading,
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
    linecache.cache[PROGRAM_NAME] = (len(source), None, source.splitlines(True), PROGRAM_NAME)
    try:
        exec(compile(source, PROGRAM_NAME, "exec"), main.__dict__)
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
