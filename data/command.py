"""`glm5 data inspect`: its options and their checks; the work is `glm5_jax.data.inspect`."""

from __future__ import annotations

from glm5_jax.errors import InputError
from glm5_jax.values import key_values


def run_inspect(args):
    from glm5_jax.data.inspect import inspect

    for flag, value, minimum in (("--rows", args.rows, 0), ("--batches", args.batches, 1),
                                 ("--chars", args.chars, 1)):
        if value < minimum:
            raise InputError(f"{flag}: must be an integer >= {minimum}; got {value}")
    inspect(args.config, rows=args.rows, stage=args.stage, batches=args.batches, chars=args.chars,
            overrides=args.override, write_rows=args.write_rows, out=args.out)


def register(sub):
    data = sub.add_parser("data", help="data pipelines")
    dsub = data.add_subparsers(dest="data_command", required=True)
    insp = dsub.add_parser("inspect", help="stage table, decoded packed rows, packing efficiency and throughput")
    insp.add_argument("--config", default="default", help="data preset name (default, glm5) or YAML file")
    insp.add_argument("--rows", type=int, default=4, help="packed rows to show")
    insp.add_argument("--stage", default=None, help="stage to show (default: the first)")
    insp.add_argument("--batches", type=int, default=20, help="batches to time for the throughput figure")
    insp.add_argument("--chars", type=int, default=400, help="characters shown per row")
    insp.add_argument("--write-rows", type=int, default=0, metavar="N", help="write the stage's first N rows to --out")
    insp.add_argument("--out", default=None, metavar="FILE.npz",
                      help="file for --write-rows (input_ids, targets, positions, segment_ids, loss_mask)")
    key_values(insp, "--override", "data config override, e.g. stages.0.seq_len=256 (repeatable)")
    insp.set_defaults(run=run_inspect)
