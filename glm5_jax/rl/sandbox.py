"""Run untrusted Python code (a model's answer and its tests) in a contained child process
(docs/post-training.md, "Sandbox").

The child (`_sandbox_child.py`, standard library only) runs in a fresh scratch folder holding the given files
and the code, with a clean environment, no inherited file descriptors but its output files, its own session and
process group, and contains itself with every layer this kernel allows: user + network + PID namespaces,
rlimits, Landlock, and a Python audit hook. The parent enforces the wall-clock limit by killing the group,
then removes the scratch folder.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import site
import subprocess
import sys
import tempfile
import time

from glm5_jax.errors import ConfigError, InputError

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
VERDICT = "\x00glm5-sandbox-verdict:"
KEEP = 4096  # bytes of stdout (its head) and stderr (its tail) a result keeps
FILE_MB = 64  # largest file the code may write
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/etc/ld.so.cache")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """`ok`: the code ran to its end and exited 0. `reason`: empty when ok, else one line. `blocked_by`: the
    layer that stopped the code ("audit", "landlock", "netns", "pidns", "rlimit", "wall clock"; empty when
    the code failed on its own). `layers`: the containment layers that were active. `exit_line`: when the code
    ended by SystemExit (`sys.exit`, `exit()`, `unittest.main()`), the line of main.py whose top-level
    statement was running."""

    ok: bool
    reason: str
    stdout: str
    stderr: str
    returncode: int
    seconds: float
    blocked_by: str = ""
    layers: tuple[str, ...] = ()
    exit_line: int | None = None


def read_roots() -> list[str]:
    """What the code may read besides its scratch folder: the Python installation (prefixes and
    site-packages) and the system's library folders."""
    roots = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()]
    roots = [os.path.realpath(r) for r in roots] + [r for r in SYSTEM_READ if os.path.exists(r)]
    return sorted(set(roots))


def _spawn(cfg: dict, cwd: str, stdout, stderr) -> subprocess.Popen:
    # one thread per numeric library: threads count against max_processes
    env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-I", "-B", CHILD, json.dumps(cfg)], cwd=cwd, env=env,
                            stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, close_fds=True,
                            start_new_session=True)


@functools.cache
def kernel_layers() -> tuple[str, ...]:
    """The layers the sandbox's child gets on this machine (probed once per process): "rlimit" always;
    "userns" / "netns" / "pidns" (namespaces), "nproc" (RLIMIT_NPROC binds: not root), "landlock" (file system),
    "landlock-net" (TCP, ABI >= 4), "landlock-scope" (abstract sockets and signals, ABI >= 6), "seccomp"
    (sockets)."""
    with tempfile.TemporaryDirectory(prefix="glm5-sandbox-") as scratch:
        cfg = dict(scratch=os.path.realpath(scratch), max_processes=2, time_limit=5, memory_mb=512,
                   file_mb=FILE_MB, read_roots=read_roots(), audit=True, probe=True)
        proc = _spawn(cfg, scratch, subprocess.PIPE, subprocess.PIPE)
        out, _ = proc.communicate(timeout=30)
    return tuple(json.loads(out.decode().splitlines()[-1])) if proc.returncode == 0 else ("rlimit",)


def _verdict(line: str) -> dict | None:
    try:
        verdict = json.loads(line[len(VERDICT):])
    except ValueError:  # a line cut by the tail, or the code's own text
        return None
    return verdict if isinstance(verdict, dict) and verdict.get("main") is True else None


def _read_output(path: str, head: bool) -> tuple[str, list[dict]]:
    """The first (head) or last KEEP bytes of an output file without its verdict lines, and the main
    process's verdicts."""
    with open(path, "rb") as f:
        if not head:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4 * KEEP))
        text = f.read(4 * KEEP).decode("utf-8", "replace")
    lines = text.split("\n")
    verdicts = [v for v in map(_verdict, (x for x in lines if x.startswith(VERDICT))) if v is not None]
    text = "\n".join(x for x in lines if not x.startswith(VERDICT)).strip("\n")
    return (text[:KEEP] if head else text[-KEEP:]), verdicts


def _check_files(files: dict[str, str]) -> None:
    for name in files:
        parts = name.split("/")
        if not name or name.startswith("/") or ".." in parts or name == "main.py":
            raise InputError(f"sandbox file {name!r}: a relative path inside the scratch folder, not main.py")


def run(code: str, *, files: dict[str, str] | None = None, time_limit: float = 10.0, memory_mb: int = 512,
        max_processes: int = 8, audit: bool = True) -> SandboxResult:
    """Runs `code` as `main.py` in a fresh scratch folder holding `files` (relative path -> text) under a
    wall-clock and CPU limit of `time_limit` seconds, an address-space limit of `memory_mb` MiB per process,
    at most `max_processes` processes (the code's own included), no network, no writes outside the scratch
    folder and no reads outside it and the Python installation. `audit=False` drops the in-process audit
    layer (for code that needs ctypes or starts programs), allowed only where Landlock and a network
    namespace contain the code instead."""
    files = files or {}
    _check_files(files)
    if time_limit <= 0 or memory_mb < 64 or max_processes < 1:
        raise ConfigError(f"sandbox: time_limit {time_limit} must be > 0, memory_mb {memory_mb} >= 64, "
                          f"max_processes {max_processes} >= 1")
    layers = kernel_layers()
    if not audit and not {"landlock", "netns"} <= set(layers):
        raise ConfigError(f"sandbox: audit=False needs Landlock and a network namespace; this kernel gives "
                          f"{', '.join(layers)}")
    with tempfile.TemporaryDirectory(prefix="glm5-sandbox-") as outdir:
        scratch = os.path.join(outdir, "scratch")
        os.mkdir(scratch, 0o700)
        for name, text in {**files, "main.py": code}.items():
            path = os.path.join(scratch, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        cfg = dict(scratch=os.path.realpath(scratch), max_processes=max_processes, time_limit=time_limit,
                   memory_mb=memory_mb, file_mb=FILE_MB, read_roots=read_roots(), audit=audit)
        out_path, err_path = os.path.join(outdir, "stdout"), os.path.join(outdir, "stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = _spawn(cfg, scratch, out, err)
        timed_out = False
        try:
            proc.wait(timeout=time_limit + 0.5)  # the child's start-up (~0.1 s) is not the code's time
        except subprocess.TimeoutExpired:
            timed_out = True
        try:  # the whole group: a fork bomb's children die with it
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        returncode = proc.wait()
        seconds = time.monotonic() - start
        stdout, _ = _read_output(out_path, head=True)
        stderr, main = _read_output(err_path, head=False)
    verdict = main[-1] if main else {}
    reason, blocked_by = verdict.get("reason", ""), verdict.get("blocked_by", "")
    # SIGXCPU: the CPU-seconds rlimit; through the PID namespace's waiter it arrives as 128 + signal
    signum = -returncode if returncode < 0 else returncode - 128 if returncode > 128 and not verdict else 0
    if timed_out or signum == signal.SIGXCPU:
        reason, blocked_by = f"time limit {time_limit:g} s exceeded", "wall clock" if timed_out else "rlimit"
    elif signum == signal.SIGXFSZ:
        reason, blocked_by = f"file size limit {FILE_MB} MiB exceeded", "rlimit"
    elif signum in signal.valid_signals():
        reason = f"killed by signal {signal.Signals(signum).name}"
    elif returncode and not reason:
        reason = f"exit status {returncode}"
    elif not returncode and not main:  # os._exit(0): the code did not run to its end
        reason = "exit status 0 before the end of the code (os._exit)"
    ok = returncode == 0 and not timed_out and bool(main)
    return SandboxResult(ok=ok, reason="" if ok else reason, stdout=stdout, stderr=stderr,
                         returncode=returncode, seconds=seconds, blocked_by="" if ok else blocked_by,
                         layers=tuple(verdict.get("layers", layers)), exit_line=verdict.get("exit_line"))
