"""Model state by dotted variable names (`layers.1.mlp.gate`): the names checkpoints store and the trainer's
flat dicts use. One set of helpers for the checkpoint store, the checkpoint manager and the train step."""

from __future__ import annotations

from flax import nnx

from glm5_jax.dotted import dotted_name


def flatten(state) -> dict:
    """nnx State (arrays, ShapeDtypeStructs or shardings as values) -> {dotted name: value}."""
    return {dotted_name(p): (v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(state)}


def to_state(values: dict, template) -> nnx.State:
    """{dotted name: value} -> an nnx State shaped like `template` (variable types and metadata kept)."""
    return nnx.from_flat_state([(p, v.replace(values[dotted_name(p)])) for p, v in nnx.to_flat_state(template)])


def nest(flat: dict) -> dict:
    """{dotted name: value} -> the nested dict Orbax stores (`{"layers": {"1": {"mlp": ...}}}`)."""
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def unnest(tree: dict, prefix: str = "") -> dict:
    """The nested dict of a checkpoint's `params` item -> {dotted name: value}."""
    out = {}
    for k, v in tree.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        out.update(unnest(v, name) if isinstance(v, dict) else {name: v})
    return out
