"""The sandbox's child side (docs/post-training.md, "Sandbox"): run by path as `python -I -B <this file> <config
json>` with the scratch folder as its working directory; standard library only, so nothing of the project (or
JAX) is imported before the user's code. It contains itself in this order, each layer where this kernel allows
it: new user, network and PID namespaces; the PID namespace's own pid_max; rlimits; Landlock; an audit hook;
then runs `main.py`. It ends with one verdict line on stderr (`VERDICT` + JSON) that names the reason and the
layer that stopped the code, for the parent to read.
"""

import ctypes
import errno
import json
import math
import os
import resource
import signal
import sys
import traceback

VERDICT = "\x00glm5-sandbox-verdict:"
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_LANDLOCK = (444, 445, 446)  # create_ruleset, add_rule, restrict_self (the same number on every arch)
FS_READ = (1 << 0) | (1 << 2) | (1 << 3)  # EXECUTE, READ_FILE, READ_DIR
# The file-system rights each Landlock ABI knows: 13 in ABI 1, REFER in 2, TRUNCATE in 3 (and 4), IOCTL_DEV in 5.
FS_ALL_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
FS_FILE_ONLY = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 14) | (1 << 15)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PROCESS_EVENTS = ("os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen", "os.forkpty")
HEAP_EVENTS = ("gc.get_objects", "gc.get_referrers", "gc.get_referents")
# Audit events that change the file system, and which of their arguments are the paths they change.
CHANGE_EVENTS = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.link": (0, 1), "os.symlink": (1,),
                 "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,)}


def denied(reason):
    """The PermissionError the audit layer raises; `sandbox_reason` marks it as the sandbox's own (the child
    imports nothing of the project, so it has no error class of its own)."""
    exc = PermissionError(reason)
    exc.sandbox_reason = reason
    return exc


def landlock_abi(libc):
    abi = libc.syscall(SYS_LANDLOCK[0], None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(abi, 0)


def landlock(libc, abi, read_roots, scratch):
    """Restricts this process and its children: read/execute under `read_roots`, everything under `scratch`,
    nothing else; with ABI >= 4 no TCP bind/connect; with ABI >= 6 no abstract UNIX sockets and no signals
    outside the sandbox. Returns the layers it added."""
    handled = FS_ALL_BY_ABI.get(abi, (1 << 16) - 1)
    fields = [handled] + ([3] if abi >= 4 else []) + ([3] if abi >= 6 else [])
    attr = (ctypes.c_uint64 * len(fields))(*fields)
    ruleset = libc.syscall(SYS_LANDLOCK[0], ctypes.byref(attr), ctypes.c_size_t(ctypes.sizeof(attr)),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        return []

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    devices = [("/dev/null", (1 << 1) | (1 << 2)), ("/dev/urandom", 1 << 2), ("/dev/zero", 1 << 2)]
    rules = [(p, FS_READ) for p in read_roots] + devices + [(scratch, handled)]
    for path, access in rules:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        if not os.path.isdir(path):
            access &= FS_FILE_ONLY
        rule = PathBeneath(access & handled, fd)
        libc.syscall(SYS_LANDLOCK[1], ruleset, 1, ctypes.byref(rule), ctypes.c_uint32(0))
        os.close(fd)
    ok = libc.syscall(SYS_LANDLOCK[2], ruleset, ctypes.c_uint32(0)) == 0
    os.close(ruleset)
    if not ok:
        return []
    return ["landlock"] + (["landlock-net"] if abi >= 4 else []) + (["landlock-scope"] if abi >= 6 else [])


def namespaces(libc):
    """New user + network (+ PID where allowed) namespaces: no network interface but a downed loopback."""
    for flags, names in ((CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID, ["userns", "netns", "pidns"]),
                         (CLONE_NEWUSER | CLONE_NEWNET, ["userns", "netns"]), (CLONE_NEWNET, ["netns"])):
        if libc.unshare(flags) == 0:
            return names
    return []


# seccomp: the audit architecture and the numbers of connect, bind, sendto, sendmsg, sendmmsg
SECCOMP_ARCH = {"x86_64": (0xC000003E, (42, 49, 44, 46, 307)), "aarch64": (0xC00000B7, (203, 200, 206, 211, 269))}


def seccomp(libc):
    """A seccomp filter refusing (EPERM) connect, bind, sendmsg, sendmmsg, sendto with an address, io_uring
    (which would bypass it), and x32 or other-architecture system calls: no socket reaches anything, named UNIX
    sockets included (Landlock does not cover those); socketpair and send on it still work."""
    if os.uname().machine not in SECCOMP_ARCH:
        return []
    audit_arch, (connect, bind, sendto, sendmsg, sendmmsg) = SECCOMP_ARCH[os.uname().machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, deny = "allow", "deny"
    prog = [(ld, None, None, 4), (jeq, None, deny, audit_arch), (ld, None, None, 0), (jge, deny, None, 0x40000000)]
    prog += [(jeq, deny, None, nr) for nr in (connect, bind, sendmsg, sendmmsg, 425)]  # 425: io_uring_setup
    prog += [(jeq, None, allow, sendto), (ld, None, None, 48), (jeq, None, deny, 0), (ld, None, None, 52),
             (jeq, allow, deny, 0), (ret, None, None, 0x7FFF0000), (ret, None, None, 0x00050000 | errno.EPERM)]
    where = {allow: len(prog) - 2, deny: len(prog) - 1}

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    def offset(i, target):  # a jump's target: the next instruction (None) or a label
        return 0 if target is None else where[target] - i - 1

    filters = (Filter * len(prog))(*[Filter(c, offset(i, t), offset(i, f), k) for i, (c, t, f, k) in enumerate(prog)])
    program = Program(len(prog), filters)
    return ["seccomp"] if libc.prctl(22, 2, ctypes.byref(program), 0, 0) == 0 else []  # SECCOMP_MODE_FILTER


def nproc_applies():
    """RLIMIT_NPROC binds neither root nor a holder of CAP_SYS_ADMIN / CAP_SYS_RESOURCE (in the initial
    namespace, read before unsharing)."""
    with open("/proc/self/status") as f:
        eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
    return os.geteuid() != 0 and not eff & ((1 << 21) | (1 << 24))


def main():
    cfg = json.loads(sys.argv[1])
    scratch, limit, probe = cfg["scratch"], cfg["max_processes"], cfg.get("probe", False)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the parent (a reward worker) killed: so is the sandbox
    nproc = nproc_applies()
    layers = ["rlimit"] + namespaces(libc)
    if "pidns" in layers:  # this process waits; its child is the namespace's init and runs the code
        child = os.fork()
        if child:
            status = os.waitstatus_to_exitcode(os.waitpid(child, 0)[1])
            os._exit(status if status >= 0 else 128 - status)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        try:  # a per-namespace pid_max (Linux >= 6.14); its floor is 301
            with open("/proc/sys/kernel/pid_max", "w") as f:
                f.write(str(max(301, limit + 1)))
        except OSError:
            layers.remove("pidns")
    cpu = math.ceil(cfg["time_limit"]) + 1
    mem = cfg["memory_mb"] << 20
    limits = [(resource.RLIMIT_CPU, cpu), (resource.RLIMIT_AS, mem), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_FSIZE, cfg["file_mb"] << 20), (resource.RLIMIT_NOFILE, 256)]
    # RLIMIT_NPROC counts the user's processes in its user namespace: only in our own one does it count ours
    # (+ 1: the waiter above)
    if nproc and "userns" in layers:
        limits.append((resource.RLIMIT_NPROC, limit + 1))
        layers.append("nproc")
    for res, value in limits:
        resource.setrlimit(res, (value, value))
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    abi = landlock_abi(libc)
    if abi:
        layers += landlock(libc, abi, cfg["read_roots"], scratch)
    layers += seccomp(libc)
    if probe:
        print(json.dumps(layers))
        return
    fork_bound = "nproc" in layers or "pidns" in layers  # else the audit layer allows no fork at all
    state = {"main": os.getpid(), "forks": 0, "last": None}
    audit_hook(cfg, state, limit if fork_bound else 1, "pidns" in layers or "landlock-scope" in layers)
    run_main(cfg, state, layers)


def inside(path, roots):
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def audit_hook(cfg, state, fork_limit, contained_signals):
    """The in-process layer: records the last file, socket and fork event (to name the reason when a kernel
    layer refuses it) and, unless `audit` is off, refuses what the kernel layers would refuse, and more."""
    scratch, deny = cfg["scratch"], cfg["audit"]
    readable = [scratch, "/dev/null", "/dev/urandom", "/dev/zero"] + cfg["read_roots"]
    realpath, fsdecode, getpid = os.path.realpath, os.fsdecode, os.getpid

    def refuse(reason):
        if deny:
            raise denied(reason)

    def hook(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = realpath(fsdecode(args[0]))
            flags, mode = args[2], args[1] or ""
            write = bool(flags & WRITE_FLAGS) if isinstance(flags, int) else any(c in mode for c in "wax+")
            state["last"] = ("write" if write else "read", path)
            if write and not inside(path, [scratch, "/dev/null"]):
                refuse(f"write outside the scratch folder denied: {path}")
            if not write and not inside(path, readable):
                refuse(f"read of {path} denied")
        elif event in CHANGE_EVENTS:
            for i in CHANGE_EVENTS[event]:
                if isinstance(args[i], (str, bytes, os.PathLike)):
                    path = os.path.join(realpath(os.path.dirname(fsdecode(args[i]))),
                                        os.path.basename(fsdecode(args[i])))  # the link itself, not its target
                    state["last"] = ("write", path)
                    if not inside(path, [scratch]):
                        refuse(f"write outside the scratch folder denied: {path}")
        elif event in ("os.listdir", "os.scandir") and isinstance(args[0], (str, bytes)):
            path = realpath(fsdecode(args[0]))
            state["last"] = ("read", path)
            if not inside(path, readable):
                refuse(f"read of {path} denied")
        elif event.startswith("socket."):
            state["last"] = ("socket", None)
            if event == "socket.__new__" and args[1] != 1:  # AF_UNIX is 1
                refuse("network access denied")
            elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"):
                refuse("network access denied")
            elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"):
                address = args[1]
                if not isinstance(address, (str, bytes)) or not inside(realpath(fsdecode(address)), [scratch]):
                    refuse("network access denied")
        elif event == "os.fork":
            state["last"] = ("fork", None)
            if getpid() != state["main"] or state["forks"] + 1 >= fork_limit:
                refuse(f"process limit {cfg['max_processes']} exceeded")
            state["forks"] += 1
        elif event in PROCESS_EVENTS:
            refuse(f"running another program denied: {event}")
        elif event.startswith("ctypes."):
            refuse("ctypes denied")
        elif event in HEAP_EVENTS:
            refuse(f"{event} denied")
        elif event in ("os.kill", "os.killpg") and not contained_signals and args[0] not in (0, getpid()):
            refuse("signals to other processes denied")

    sys.addaudithook(hook)


def classify(exc, state, cfg, layers):
    """(reason, blocked_by) of the exception that ended the code."""
    last = state["last"] or ("", None)
    if getattr(exc, "sandbox_reason", None):
        return exc.sandbox_reason, "audit"
    if isinstance(exc, MemoryError):
        return f"memory limit {cfg['memory_mb']} MiB exceeded", "rlimit"
    if isinstance(exc, OSError) and exc.errno == errno.EAGAIN and last[0] == "fork":
        return f"process limit {cfg['max_processes']} exceeded", "rlimit" if "nproc" in layers else "pidns"
    if isinstance(exc, OSError) and last[0] == "socket":
        return "network access denied", {errno.EPERM: "seccomp", errno.EACCES: "landlock"}.get(exc.errno, "netns")
    if (isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM) and last[0] in ("read", "write")
            and exc.filename is not None and os.path.basename(os.fsdecode(exc.filename)) == os.path.basename(last[1])):
        if last[0] == "write":
            return f"write outside the scratch folder denied: {last[1]}", "landlock"
        return f"read of {last[1]} denied", "landlock"
    line = traceback.format_exception_only(exc)[-1].strip()
    return f"exit status 1: {line}", ""


def module_line(tb, filename):
    """The line of `filename`'s top-level code that was running when the traceback `tb` was raised."""
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename and tb.tb_frame.f_code.co_name == "<module>":
            return tb.tb_lineno
        tb = tb.tb_next
    return None


def run_main(cfg, state, layers):
    status, reason, blocked_by, exit_line = 0, "", "", None
    filename = os.path.join(cfg["scratch"], "main.py")
    sys.argv = [filename]
    try:
        with open("main.py", encoding="utf-8") as f:
            code = compile(f.read(), filename, "exec")
        exec(code, {"__name__": "__main__", "__file__": filename, "__builtins__": __builtins__})
    except SystemExit as exc:
        status = int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
        reason = f"exit status {status}" if status else ""
        exit_line = module_line(exc.__traceback__, filename)
    except BaseException as exc:  # noqa: BLE001 -- any error of the code is its verdict
        reason, blocked_by = classify(exc, state, cfg, layers)  # before printing reads files
        traceback.print_exc(limit=-8)
        status = 1
    verdict = {"reason": reason, "blocked_by": blocked_by, "layers": layers, "exit_line": exit_line,
               "main": os.getpid() == state["main"]}
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stderr.write("\n" + VERDICT + json.dumps(verdict) + "\n")
        sys.stderr.flush()
    finally:
        os._exit(status & 0xFF)


if __name__ == "__main__":
    main()
