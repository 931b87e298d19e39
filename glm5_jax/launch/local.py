"""`glm5 launch local`: N processes of one `glm5` command on this machine, joined into one JAX job.

    glm5 launch local --processes 2 --devices-per-process 4 -- train --config quickstart max_steps=4

Each child gets JAX_COORDINATOR_ADDRESS (localhost and a free port), JAX_NUM_PROCESSES, JAX_PROCESS_ID,
M simulated CPU devices (XLA_FLAGS --xla_force_host_platform_device_count) and gloo CPU collectives. Their
output lines come out prefixed with the process index (gloo's per-group "connected to peer ranks" lines
dropped); SIGTERM and SIGINT are forwarded to every child; the exit status is the first failing child's
(0 when all succeed). After a child fails, the others get `--stop-after` seconds to end by themselves
(a training run's peer monitor ends them with a message naming the lost process) before they are killed.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from glm5_jax.errors import ConfigError

_NOISE = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks|^\d+ is connected to \d+ peer ranks")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def child_env(base: dict, index: int, processes: int, devices: int, port: int) -> dict:
    env = dict(base)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env.update({"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip(),
                "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(processes),
                "JAX_PROCESS_ID": str(index), "PYTHONUNBUFFERED": "1"})
    return env


def _pump(index: int, stream, lock: threading.Lock):
    for line in stream:
        if _NOISE.search(line):
            continue
        with lock:
            sys.stdout.write(f"[{index}] {line}" if line.endswith("\n") else f"[{index}] {line}\n")
            sys.stdout.flush()


def launch_local(command: list[str], processes: int, devices: int, port: int | None = None,
                 stop_after: float = 120.0) -> int:
    """Run `glm5 COMMAND...` as `processes` processes of `devices` CPU devices each; the exit status."""
    if processes < 1:
        raise ConfigError(f"--processes: must be a positive integer; got {processes}")
    if devices < 1:
        raise ConfigError(f"--devices-per-process: must be a positive integer; got {devices}")
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"--port: must be a TCP port, 1 to 65535; got {port}")
    if stop_after <= 0:
        raise ConfigError(f"--stop-after: must be a positive number of seconds; got {stop_after}")
    command = command[1:] if command[:1] == ["--"] else command
    if not command:
        raise ConfigError("launch local: give the glm5 command after --, e.g. -- train --config quickstart")
    port = port or free_port()
    lock = threading.Lock()
    children, pumps = [], []
    for i in range(processes):
        child = subprocess.Popen([sys.executable, "-m", "glm5_jax.cli", *command], text=True, bufsize=1,
                                 env=child_env(os.environ, i, processes, devices, port),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        children.append(child)
        pumps.append(threading.Thread(target=_pump, args=(i, child.stdout, lock), daemon=True))
        pumps[-1].start()

    def forward(signum, frame):
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)
    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status, failed_at = 0, None
        while any(c.poll() is None for c in children):
            for i, c in enumerate(children):
                if c.returncode not in (None, 0) and status == 0:
                    status, failed_at = c.returncode, time.monotonic()
                    _say(lock, f"glm5 launch: process {i} of {processes} exited with status {_status(c.returncode)}"
                               f"; waiting up to {stop_after:g} s for the others")
            if failed_at is not None and time.monotonic() - failed_at > stop_after:
                for i, c in enumerate(children):
                    if c.poll() is None:
                        _say(lock, f"glm5 launch: process {i} still running {stop_after:g} s later; killing it")
                        c.kill()
            time.sleep(0.1)
        for i, c in enumerate(children):
            if c.returncode != 0 and status == 0:
                status = c.returncode
                _say(lock, f"glm5 launch: process {i} of {processes} exited with status {_status(c.returncode)}")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        for p in pumps:
            p.join(5.0)
    if status < 0:  # killed by a signal: the shell's convention
        return 128 - status
    return status


def _status(code: int) -> str:
    return f"{code} (killed by {signal.Signals(-code).name})" if code < 0 else str(code)


def _say(lock, text: str):
    with lock:
        print(text, file=sys.stderr, flush=True)
