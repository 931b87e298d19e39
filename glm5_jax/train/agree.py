"""Decisions every process must take alike, and small host values every process must see.

A save is a collective (every process writes its shards, then process 0 commits): if one host decided to
save at step s and another did not, the first would wait in Orbax alone. So whatever is decided from host
state (a SIGTERM that reached one host, the wall clock of a time-based save) goes through `agree` once per
step: a SIGTERM on any process stops all of them, and process 0's clock decides time-based saves. Values
computed by the train step itself (the loss, the non-finite flag) are global arrays, the same on every
process, and need no agreement. With one process nothing is exchanged.
"""

from __future__ import annotations

import json

import jax
import numpy as np


def _allgather(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x))


def agree(stop: bool, due: bool) -> tuple[bool, bool]:
    """(stop on any process, process 0's `due`)."""
    if jax.process_count() == 1:
        return stop, due
    flags = _allgather(np.array([int(stop), int(due)], np.int32)).reshape(jax.process_count(), 2)
    return bool(flags[:, 0].any()), bool(flags[0, 1])


def gather_json(value) -> list:
    """Every process's JSON-serialisable `value`, in process order."""
    if jax.process_count() == 1:
        return [value]
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = _allgather(np.array([len(data)], np.int64)).reshape(-1)
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[:len(data)] = data
    rows = _allgather(padded).reshape(len(lengths), -1)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(rows, lengths, strict=True)]
