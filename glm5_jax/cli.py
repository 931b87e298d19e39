"""The `glm5` command line: one entry point, a subcommand per job.

Errors a user can fix (bad config, bad input files, an existing output) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading

from glm5_jax.bench import command as bench
from glm5_jax.checkpoint import command as checkpoint
from glm5_jax.checkpoint.outputs import quiet_write_failures, remove_in_progress
from glm5_jax.convert import command as convert
from glm5_jax.data import command as data
from glm5_jax.errors import ConfigError, Glm5Error
from glm5_jax.generate import command as generate
from glm5_jax.launch import command as launch
from glm5_jax.plan import command as plan
from glm5_jax.train import command as train

# Each package that does a job owns its subcommands: a `command` module whose `register(subparsers)` adds
# them with their options and help, each parser's `run` set to the function that runs it.
COMMANDS = (convert, checkpoint, data, plan, bench, train, generate, launch)


class _Parser(argparse.ArgumentParser):
    """argparse whose errors (a missing or unknown option, a value of the wrong type) are one `glm5: error:`
    line like every other (a ConfigError, exit status 2), not a usage block; subcommands' parsers are its kind."""

    def error(self, message: str):
        message = re.sub(r"^argument ([^:]+): ", r"\1: ", message)
        raise ConfigError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="glm5", description="GLM-5 training stack in JAX/Flax.")
    p.add_argument("-v", "--verbose", action="store_true", help="show library log messages")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.register(sub)
    return p


_GRACE_S = 3.0  # a stopped command that has not unwound by then (blocked in C, say) is ended outright
_stop_signal: list = [None]


def _exit_stopped(signum: int):
    """Remove temporary outputs, end worker processes, exit 128 + signal number (no interpreter teardown,
    which can crash while XLA threads still run)."""
    remove_in_progress()
    import multiprocessing

    for child in multiprocessing.active_children():  # Grain workers
        child.terminate()
    sys.stdout.flush()
    print(f"glm5: stopped by {signal.Signals(signum).name}; nothing written", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def _stop(signum, frame):
    """SIGTERM, like Ctrl-C, unwinds the command (its atomic writers remove what they had started); a
    second signal, or a command still running after _GRACE_S, ends it at once."""
    if _stop_signal[0] is not None:
        _exit_stopped(signum)
    _stop_signal[0] = signum
    # The process now ends within _GRACE_S with one line. Until then what else fails is a consequence of the
    # stop, not the user's error: the interrupt landing where Python drops exceptions (a gc callback), or
    # background threads (Orbax's event loop, TensorStore callbacks) posting to a loop that has closed.
    sys.unraisablehook = lambda unraisable: None
    sys.excepthook = lambda *exc_info: None
    threading.excepthook = lambda hook_args: None
    timer = threading.Timer(_GRACE_S, _exit_stopped, (signum,))
    timer.daemon = True
    timer.start()
    raise KeyboardInterrupt


def _run(args) -> int:
    try:
        args.run(args)
    except Glm5Error as e:  # the one family of errors a user can fix (glm5_jax/errors.py)
        print(f"glm5: {e.kind}: {e}", file=sys.stderr)
        return e.exit_status
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except Glm5Error as e:
        print(f"glm5: {e.kind}: {e}", file=sys.stderr)
        return e.exit_status
    args.argv = list(sys.argv[1:] if argv is None else argv)  # (`glm5 plan` may re-execute itself with them)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if not args.verbose:
        logging.getLogger("absl").setLevel(logging.ERROR)
        quiet_write_failures()
    # `glm5 train` stops at a step boundary and checkpoints (its own handlers); every other command stops at
    # once, exit status 128 + signal number, and leaves no partial output.
    if args.command == "train" or threading.current_thread() is not threading.main_thread():
        return _run(args)
    _stop_signal[0] = None
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _run(args)
    except BaseException:  # the interrupt, or whatever it set off while the command unwound
        if _stop_signal[0] is None:
            raise
        _exit_stopped(_stop_signal[0])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
