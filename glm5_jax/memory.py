"""Whether the state a command is about to materialise fits the memory it has, decided from abstract shapes
(`nnx.eval_shape`, `jax.eval_shape`: nothing allocated) before anything is allocated.

One check (`check_fits`) for every command that builds a model on the host or the devices: `glm5 init`,
`forward`, `generate`, `convert` (both ways), `train`, `eval` and `bench`. On CPU the devices are the host's
memory: the bytes of every local device's shards are compared with the host's available memory (psutil). On an
accelerator each device's shards are compared with what that device has free (its `memory_stats`).
"""

from __future__ import annotations

import math

from glm5_jax.errors import MemoryTooSmall


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def state_bytes(leaves) -> tuple[int, int]:
    """(bytes on the fullest device, bytes on all of this process's devices together) of `leaves`: arrays or
    ShapeDtypeStructs, sharded (each device holds one shard) or not (one copy on the default device)."""
    import jax
    import numpy as np

    per_device, local = {}, 0
    for leaf in jax.tree.leaves(leaves):
        sharding = getattr(leaf, "sharding", None)
        itemsize = np.dtype(leaf.dtype).itemsize
        if sharding is None:
            devices, shard = [jax.local_devices()[0]], leaf.shape
        else:
            devices, shard = sorted(sharding.addressable_devices, key=lambda d: d.id), sharding.shard_shape(leaf.shape)
        nbytes = math.prod(shard) * itemsize
        for d in devices:
            per_device[d] = per_device.get(d, 0) + nbytes
        local += nbytes * len(devices)
    return max(per_device.values(), default=0), local


def check_fits(what: str, leaves):
    """Refuse (one `MemoryTooSmall` line naming both figures) when `leaves`, the state described as `what`
    ("init: the model's parameters"), would not fit the host's available memory (CPU devices) or a device's free
    memory (accelerators)."""
    import jax
    import psutil

    per_device, local = state_bytes(leaves)
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        if per_device > free:
            raise MemoryTooSmall(f"{what} need {_size(per_device)} on each {device.platform} device; one has "
                                 f"{_size(free)} free")
        return
    available = psutil.virtual_memory().available
    if local > available:
        raise MemoryTooSmall(f"{what} need {_size(local)} of host memory; {_size(available)} is available")
