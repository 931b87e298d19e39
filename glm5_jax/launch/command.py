"""`glm5 launch local`: its options; the launcher is `glm5_jax.launch.local`."""

from __future__ import annotations

import argparse
import sys


def run_local(args):
    from glm5_jax.launch.local import launch_local

    sys.exit(launch_local(args.command, args.processes, args.devices_per_process, args.port, args.stop_after))


def register(sub):
    la = sub.add_parser("launch", help="start a multi-process job (local: N processes on this machine)")
    lsub = la.add_subparsers(dest="launcher", required=True)
    loc = lsub.add_parser("local", help="N processes of a glm5 command on this machine, CPU devices, gloo "
                          "collectives (development and tests)")
    loc.add_argument("--processes", type=int, required=True, help="number of processes")
    loc.add_argument("--devices-per-process", type=int, default=1, help="simulated CPU devices of each (default 1)")
    loc.add_argument("--port", type=int, default=None, help="coordinator port on localhost (default: a free one)")
    loc.add_argument("--stop-after", type=float, default=120.0,
                     help="seconds the others get to end by themselves after one fails (default 120)")
    loc.add_argument("command", nargs=argparse.REMAINDER, help="-- then the glm5 command, e.g. -- train --config "
                     "quickstart max_steps=4")
    loc.set_defaults(run=run_local)
