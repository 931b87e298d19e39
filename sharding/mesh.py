"""Device meshes with the six parallelism axes, ordered so the chattiest axes sit on the fastest links."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from glm5_jax.errors import ConfigError

# NVLink domain / ICI neighbours): tensor parallelism talks every layer, expert all-to-alls every MoE
# layer, context all-gathers every attention, while pipeline only passes activations between stages.
AXES = ("pipeline", "data", "fsdp", "context", "expert", "tensor")


def resolve_sizes(sizes: dict[str, int], n_devices: int, key: str = "mesh") -> dict[str, int]:
    """Sizes for every axis (missing = 1); one axis may be -1 to take the remaining devices."""
    for name in sizes:
        if name not in AXES:
            raise ConfigError(f"{key}.{name}: unknown mesh axis; axes are {', '.join(AXES)}")
    out = {a: sizes.get(a, 1) for a in AXES}
    for a, v in out.items():
        if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v != -1):
            raise ConfigError(f"{key}.{a}: must be a positive integer or -1 (fill); got {v!r}")
    fill = [a for a, v in out.items() if v == -1]
    if len(fill) > 1:
        raise ConfigError(f"{key}: only one axis may be -1; got {', '.join(fill)}")
    fixed = math.prod(v for v in out.values() if v != -1)
    if fill:
        if n_devices % fixed:
            raise ConfigError(f"{key}.{fill[0]}: -1 must fill {n_devices} devices, but the other axes multiply "
                              f"to {fixed}, which does not divide it")
        out[fill[0]] = n_devices // fixed
    if math.prod(out.values()) != n_devices:
        shape = " x ".join(f"{a} {v}" for a, v in out.items() if v > 1) or "all 1"
        raise ConfigError(f"{key}: axis sizes ({shape}) multiply to {math.prod(out.values())}, but there are "
                          f"{n_devices} devices; sizes must multiply to the device count (or set one to -1)")
    return out


def build_mesh(ici: dict[str, int], dcn: dict[str, int] | None = None, devices=None) -> Mesh:
    """A mesh over `devices` (default all) with axes AXES, all of AxisType.Auto.

    `ici` gives the axis sizes within a slice (or node); `dcn` the factors across slices (multi-slice /
    multi-node; default 1 for every axis). The full axis size is ici * dcn. With dcn factors the devices
    are arranged by slice (`create_hybrid_device_mesh`), so only the axes with a dcn factor cross the slow
    network; otherwise `create_device_mesh` picks an order that suits the physical topology.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn_sizes = resolve_sizes(dcn or {}, _slice_count(devices), key="dcn") if dcn else {a: 1 for a in AXES}
    per_slice = len(devices) // math.prod(dcn_sizes.values())
    ici_sizes = resolve_sizes(ici, per_slice, key="mesh")
    ici_shape, dcn_shape = [ici_sizes[a] for a in AXES], [dcn_sizes[a] for a in AXES]
    if math.prod(dcn_shape) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices, allow_split_physical_axes=True)
    else:
        try:
            grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError):  # topologies mesh_utils does not know: keep the given order
            grid = np.asarray(devices).reshape(ici_shape)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def _slice_count(devices) -> int:
    """Number of slices (TPU multi-slice) or hosts (GPU nodes) among `devices`."""
    if hasattr(devices[0], "slice_index"):
        return len({d.slice_index for d in devices})
    return len({d.process_index for d in devices})


def describe(mesh: Mesh) -> str:
    """`data 2 x tensor 4 (8 devices)`: the axes larger than 1."""
    shape = " x ".join(f"{a} {n}" for a, n in mesh.shape.items() if n > 1) or "1 device"
    return f"{shape} ({mesh.size} devices)"
