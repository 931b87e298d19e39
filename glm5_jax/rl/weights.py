"""Weight pushes to the rollout workers through Ray's object store, in bounded buckets (docs/rl-async.md).

`publish` packs named host arrays into objects of at most `bucket_bytes` each (an array larger than a bucket is
split into byte ranges), so no push makes one object the size of the model and a reader never holds more than
one bucket beyond its own copy. `fetch` assembles the named arrays from those objects into fresh arrays of the
shapes and dtypes it was told, one bucket at a time, and checks that every byte arrived.
"""

from __future__ import annotations

import numpy as np


def _bytes(a: np.ndarray) -> np.ndarray:
    """A flat uint8 view of `a` (a copy only where `a` is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def buckets(named: dict[str, np.ndarray], bucket_bytes: int) -> list[list[tuple[str, int, np.ndarray]]]:
    """`named` as buckets of (name, byte offset, uint8 chunk) of at most `bucket_bytes` bytes each, in order."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes {bucket_bytes} must be >= 1")
    out, current, size = [], [], 0
    for name, array in named.items():
        data, offset = _bytes(array), 0
        while True:  # (an empty array still gets its entry)
            take = min(data.size - offset, bucket_bytes - size)
            current.append((name, offset, data[offset:offset + take]))
            size, offset = size + take, offset + take
            if size == bucket_bytes:
                out.append(current)
                current, size = [], 0
            if offset >= data.size:
                break
    if current:
        out.append(current)
    return out


def publish(named: dict[str, np.ndarray], bucket_bytes: int) -> list:
    """Put `named` into Ray's object store as buckets of at most `bucket_bytes`; their references, in order."""
    import ray

    return [ray.put(b) for b in buckets(named, bucket_bytes)]


def fetch(refs: list, like: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    """The arrays `publish` put behind `refs`, as {name: array of like[name]'s (shape, dtype)}."""
    import ray

    out = {name: np.empty(shape, dtype) for name, (shape, dtype) in like.items()}
    flat = {name: a.reshape(-1).view(np.uint8) for name, a in out.items()}
    got = dict.fromkeys(out, 0)
    for ref in refs:
        for name, offset, chunk in ray.get(ref):
            flat[name][offset:offset + chunk.size] = chunk
            got[name] += chunk.size
        del chunk  # (the bucket's shared-memory view goes before the next is read)
    short = [f"{n} ({got[n]} of {flat[n].size} bytes)" for n in out if got[n] != flat[n].size]
    if short:
        raise ValueError(f"weight push incomplete: {', '.join(short[:3])}")
    return out
