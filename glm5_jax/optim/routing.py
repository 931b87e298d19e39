"""Which optimizer trains each parameter, and how Muon sees it as matrices; the `glm5 optimizer` table.

Routing works on dotted parameter names (`layers.1.mlp.experts_gate`, as `named_variables` gives them)
and on the logical axes every parameter carries, so it needs no knowledge of module classes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import sys
from collections import defaultdict

from glm5_jax.optim.config import OptimizerConfig
from glm5_jax.optim.muon import MatrixSpec

MUON, ADAMW, FROZEN = "muon", "adamw", "frozen"

# Optimizer by parameter name; first match wins. Anything unmatched is Muon if it has >= 2 axes besides
# the leading batch axes (a matrix), else AdamW. The router gate [D, E] (float32) and the indexer's weights_proj [D, heads]
# are matrices and so go to Muon.
ROUTES = (
    ("*e_score_correction_bias", FROZEN),  # selection bias: moved by the load-balancing rule, never by gradients
    ("embed_tokens", ADAMW),
    ("lm_head", ADAMW),
    ("*norm*", ADAMW),  # every RMSNorm / LayerNorm weight and bias, incl. indexer.k_norm
    ("*bias", ADAMW),
)

# Leading axes that stack independent matrices: every layer and every expert is its own matrix.
BATCH_AXES = ("layers", "experts")
# A per-head axis sits behind its head axis and belongs to the same side of the matrix (layout [in..., out...]).
HEAD_OF = {"head_dim": "heads", "index_head_dim": "index_heads"}


def split_rules(cfg, opt: OptimizerConfig) -> dict[str, tuple[bool, tuple[int, ...] | None]]:
    """Muon-Split, by parameter (last name): (orthogonalise per head?, blocks each head's columns are cut into)."""
    return {
        "q_b_proj": (opt.split_heads, (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim) if opt.split_qk_rope else None),
        "kv_b_proj": (opt.split_heads, (cfg.qk_nope_head_dim, cfg.v_head_dim)),  # W^UK | W^UV
        "o_proj": (opt.split_heads and opt.split_o_proj, None),
    }


@dataclasses.dataclass(frozen=True)
class Route:
    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    optimizer: str  # muon | adamw | frozen
    spec: MatrixSpec | None = None  # Muon's view (muon only)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def matrices(self) -> list[tuple[int, int, int]]:
        """(count, fan_in, fan_out) of each Newton-Schulz matrix kind; empty unless Muon."""
        return self.spec.matrices(self.shape) if self.spec else []


def _leading_batch_axes(axes) -> int:
    n = 0
    while n < len(axes) and axes[n] in BATCH_AXES:
        n += 1
    return n


def matrix_spec(name: str, axes: tuple[str, ...], cfg, opt: OptimizerConfig) -> MatrixSpec:
    """Muon's view of a matrix parameter from its logical axes (see BATCH_AXES, HEAD_OF, split_rules)."""
    rest = list(range(_leading_batch_axes(axes), len(axes)))
    last = rest[-1]
    out_start = last - 1 if HEAD_OF.get(axes[last]) == axes[last - 1] else last
    reduction, output = [a for a in rest if a < out_start], [a for a in rest if a >= out_start]
    per_head, segments = split_rules(cfg, opt).get(name.rsplit(".", 1)[-1], (False, None))
    if not per_head:
        return MatrixSpec(tuple(reduction), tuple(output))
    # The head axis becomes a batch axis: each head is its own matrix (or its own blocks).
    head = next(a for a in rest if axes[a] in HEAD_OF.values())
    reduction, output = [a for a in reduction if a != head], [a for a in output if a != head]
    if segments:
        return MatrixSpec(tuple(reduction), tuple(output), output[-1], tuple(segments))
    return MatrixSpec(tuple(reduction), tuple(output))


def route(name: str, shape, axes, cfg, opt: OptimizerConfig) -> Route:
    """The optimizer (and, for Muon, the matrix view) of one parameter."""
    shape, axes = tuple(shape), tuple(axes)
    optimizer = next((o for pattern, o in ROUTES if fnmatch.fnmatchcase(name, pattern)), None)
    if optimizer is None:
        matrix = len(axes) - _leading_batch_axes(axes) >= 2
        optimizer = MUON if matrix and opt.matrix_optimizer == "muon" else ADAMW
    spec = matrix_spec(name, axes, cfg, opt) if optimizer == MUON else None
    return Route(name, shape, axes, optimizer, spec)


def route_variables(variables: dict, cfg, opt: OptimizerConfig) -> dict[str, Route]:
    """Routes of `{dotted name: nnx.Variable}` (real or abstract), e.g. from `named_variables(model)`."""
    return {name: route(name, v.shape, v.get_metadata()["logical_axes"], cfg, opt) for name, v in variables.items()}


def summary(routes: list[Route]) -> dict[str, dict[str, int]]:
    """Per optimizer: `arrays` (stored tensors, a layer stack counts once), `matrices` (Newton-Schulz
    matrices per step), `params` (numbers)."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"arrays": 0, "matrices": 0, "params": 0})
    for r in routes:
        s = out[r.optimizer]
        s["arrays"] += 1
        s["matrices"] += sum(count for count, _, _ in r.matrices())
        s["params"] += r.size
    return {k: out[k] for k in (MUON, ADAMW, FROZEN) if k in out}


def _ns_text(r: Route) -> tuple[str, str]:
    if not r.spec:
        return "", ""
    kinds = r.matrices()
    shapes = " | ".join(f"{fi}x{fo}" for _, fi, fo in kinds)
    return shapes, " + ".join(str(c) for c, _, _ in kinds)


def print_table(routes: list[Route], name_of=lambda name: name, console=None):
    """Print the per-parameter routing and the per-optimizer summary with rich; `name_of(dotted name)` is
    the name shown (e.g. a layer stack's index as the layers it holds)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title="optimizer routing", show_lines=False)
    for col, justify in (("parameter", "left"), ("shape", "left"), ("optimizer", "left"),
                         ("Newton-Schulz matrix", "left"), ("matrices", "right"), ("params", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for r in routes:
        shapes, counts = _ns_text(r)
        table.add_row(name_of(r.name), "x".join(map(str, r.shape)), r.optimizer, shapes, counts,
                      f"{r.size:,}")
    console.print(table)
    totals = summary(routes)
    table = Table(title="summary")
    for col in ("optimizer", "arrays", "matrices", "params", "share"):
        table.add_column(col, justify="left" if col == "optimizer" else "right")
    total = sum(s["params"] for s in totals.values())
    for name, s in totals.items():
        table.add_row(name, str(s["arrays"]), f"{s['matrices']:,}", f"{s['params']:,}", f"{s['params'] / total:.2%}")
    table.add_row("total", str(sum(s["arrays"] for s in totals.values())),
                  f"{sum(s['matrices'] for s in totals.values()):,}", f"{total:,}", "100.00%")
    console.print(table)
