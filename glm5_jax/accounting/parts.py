"""The step's model parts, as BENCHMARKS.md tables them, each a set of `glm5_jax.scopes` names.

A compiled product belongs to the part of the innermost part scope it ran in (its `by_scope` key, see
glm5_jax/accounting/compiled.py): the top-k merge loop inside the indexer inside the attention is the
attention's; a product in no part scope is `other`. `within` sums a region instead: every product that ran
anywhere inside one scope (the pipeline's iterations, whatever parts they hold). Nothing here knows a Python
function's name, so renaming one changes no figure. A product whose metadata the compiler dropped has its
caller's (a loop's): inside the pipeline that is `scopes.PIPELINE` alone, the last part below.
"""

from __future__ import annotations

from glm5_jax import scopes

PARTS = (("routed experts (grouped matmul)", (scopes.ROUTED_EXPERTS,)),
         ("router", (scopes.ROUTER,)),
         ("dense FFN, shared expert", (scopes.FFN,)),
         ("attention, indexer", (scopes.ATTENTION, scopes.INDEXER, scopes.TOPK_MERGE, scopes.FLASH_KEYS)),
         ("output heads (main and MTP depths)", (scopes.HEAD,)),
         ("MTP input projection", (scopes.MTP_PROJECTION,)),
         ("Muon Newton-Schulz", (scopes.NEWTON_SCHULZ,)),
         ("pipeline iterations, part not in the metadata", (scopes.PIPELINE,)))
OTHER = "other"
_PART_OF = {scope: name for name, names in PARTS for scope in names}


def _path(key: str) -> list[str]:
    return key.removesuffix(" (backward)").split("/")


def part(key: str) -> str:
    """The part of a `by_scope` key: its innermost scope that belongs to a part (OTHER without one)."""
    return next((_PART_OF[s] for s in reversed(_path(key)) if s in _PART_OF), OTHER)


def by_part(by_scope: dict[str, float]) -> dict[str, float]:
    """FLOPs per part (every part of PARTS, then OTHER) of a `by_scope` table."""
    out = dict.fromkeys([name for name, _ in PARTS] + [OTHER], 0.0)
    for key, flops in by_scope.items():
        out[part(key)] += flops
    return out


def within(by_scope: dict[str, float], scope: str, but: str | None = None) -> float:
    """FLOPs that ran inside `scope` (at any depth), leaving out those of the part of scope `but`."""
    return sum(f for key, f in by_scope.items() if scope in _path(key) and (but is None or part(key) != part(but)))
