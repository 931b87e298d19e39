"""The code sandbox: each attack the issue names is stopped with its reason, by the audit layer and, where
this kernel has them, by the kernel layers alone; a normal program runs; nothing is left behind."""

import os
import socket

import pytest

from glm5_jax.rl import sandbox

FORK_BOMB = "import os\nwhile True:\n    os.fork()\n"
# Only the first process forks (its children sleep): the kernel's process bound is what ends it.
FORK_SLEEPERS = "import os, time\nwhile True:\n    if os.fork() == 0:\n        time.sleep(60)\n"
KERNEL = {"landlock", "netns"} <= set(sandbox.kernel_layers())


def strays():
    """Processes still running this checkout's sandbox child."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if sandbox.CHILD.encode() in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


@pytest.fixture
def listener():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        s.settimeout(0.2)
        yield s


@pytest.fixture
def unix_listener(tmp_path):
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "s.sock"))  # a named UNIX socket, as a local Ray instance listens on
        s.listen(1)
        s.settimeout(0.2)
        yield s


def attacks(tmp_path, port):
    secret = tmp_path / "secret.txt"
    secret.write_text("the test's own file")
    outside = tmp_path / "written.txt"
    return {
        "local network": (f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))\n",
                          "network access denied"),
        "unix socket": (f"import socket\nsocket.socket(socket.AF_UNIX).connect({str(tmp_path / 's.sock')!r})\n",
                        "network access denied"),
        "public network": ("import socket\nsocket.socket().connect(('1.1.1.1', 53))\n", "network access denied"),
        "write outside": (f"open({str(outside)!r}, 'w').write('x')\n",
                          f"write outside the scratch folder denied: {outside}"),
        "remove outside": (f"import os\nos.remove({str(secret)!r})\n",
                           f"write outside the scratch folder denied: {secret}"),
        "read not given": (f"print(open({str(secret)!r}).read())\n", f"read of {secret} denied"),
    }, outside


def test_a_normal_program_reads_its_files_and_writes_in_its_scratch_folder():
    code = "import json\nprint(open('data/in.txt').read().upper())\nopen('out.txt', 'w').write('x')\n"
    r = sandbox.run(code, files={"data/in.txt": "hello"}, time_limit=5)
    assert (r.ok, r.reason, r.stdout, r.returncode) == (True, "", "HELLO", 0), r.stderr
    assert "rlimit" in r.layers
    bad = sandbox.run("assert 1 + 1 == 3, 'arithmetic'", time_limit=5)
    assert (bad.ok, bad.reason, bad.blocked_by) == (False, "exit status 1: AssertionError: arithmetic", "")
    assert "AssertionError" in bad.stderr
    syntax = sandbox.run("def f(:\n", time_limit=5)
    assert (syntax.ok, syntax.reason) == (False, "exit status 1: SyntaxError: invalid syntax")


def test_how_the_code_ended():
    early = sandbox.run("import sys\nsys.exit(0)\nprint('never')\n", time_limit=5)
    assert (early.ok, early.exit_line, early.stdout) == (True, 2, "")
    assert sandbox.run("print('x')\n", time_limit=5).exit_line is None
    hidden = sandbox.run("import os\nos._exit(0)\n", time_limit=5)
    assert (hidden.ok, hidden.reason) == (False, "exit status 0 before the end of the code (os._exit)")


@pytest.mark.parametrize("audit", [True, False])
def test_network_files_and_reads_are_contained(tmp_path, listener, unix_listener, audit):
    if not audit and not KERNEL:
        pytest.skip("no Landlock or network namespace on this kernel: the audit layer is the only one")
    cases, outside = attacks(tmp_path, listener.getsockname()[1])
    for name, (code, reason) in cases.items():
        r = sandbox.run(code, time_limit=5, audit=audit)
        assert (r.ok, r.reason) == (False, reason), (name, r.stderr)
        assert (r.blocked_by == "audit") == audit, (name, r.blocked_by)
        assert "the test's own file" not in r.stdout
    assert not outside.exists() and (tmp_path / "secret.txt").exists()
    for server in (listener, unix_listener):
        with pytest.raises(socket.timeout):
            server.accept()


def test_infinite_loop_and_memory_hog():
    loop = sandbox.run("while True:\n    pass\n", time_limit=2)
    assert (loop.ok, loop.reason) == (False, "time limit 2 s exceeded")
    assert loop.seconds < 4
    hog = sandbox.run("x = bytearray(1 << 30)\n", memory_mb=128, time_limit=5)
    assert (hog.ok, hog.reason, hog.blocked_by) == (False, "memory limit 128 MiB exceeded", "rlimit")


@pytest.mark.parametrize("audit", [True, False])
def test_fork_bomb_is_bounded_and_leaves_no_process(audit):
    if not audit and not KERNEL:
        pytest.skip("no Landlock or network namespace on this kernel: the audit layer is the only one")
    r = sandbox.run(FORK_BOMB if audit else FORK_SLEEPERS, time_limit=5, max_processes=4, audit=audit)
    assert (r.ok, r.reason) == (False, "process limit 4 exceeded"), r.stderr
    assert r.blocked_by in (("audit",) if audit else ("rlimit", "pidns"))
    assert not strays()


def test_other_programs_ctypes_and_bad_arguments():
    r = sandbox.run("import subprocess\nsubprocess.run(['true'])\n", time_limit=5)
    assert (r.ok, r.reason) == (False, "running another program denied: subprocess.Popen")
    r = sandbox.run("import ctypes\nctypes.CDLL(None).getpid()\n", time_limit=5)
    assert (r.ok, r.reason) == (False, "ctypes denied")
    with pytest.raises(sandbox.InputError, match="'../x'"):
        sandbox.run("pass", files={"../x": ""})
    with pytest.raises(sandbox.ConfigError, match="memory_mb 1 >= 64"):
        sandbox.run("pass", memory_mb=1)
