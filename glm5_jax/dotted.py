"""The one way a parameter's path becomes its dotted name (`layers.1.mlp.experts_gate`): the names
checkpoints store, the optimizer routes by and the trainer's flat dicts use. A module of its own, below
every package (optim may not import the model or the checkpoint package; the model may not import checkpoint).
"""

from __future__ import annotations


def dotted_name(path) -> str:
    """Dotted name of an nnx flat-state path (strings and ints) or of a pytree key path (DictKey, GetAttrKey,
    SequenceKey / FlattenedIndexKey; a path to an nnx Variable's array ends in `.value`)."""
    return ".".join(_part(k) for k in path)


def _part(key) -> str:
    for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)
