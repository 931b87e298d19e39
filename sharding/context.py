"""The active parallel layout, as model code sees it: logical names in, mesh placement out.

Model code calls `constrain(x, ("batch", "length", "act_embed"))`; it never names a mesh axis (what the
layout runs the parallel pieces with: `sharding/runners.py`). Outside `use(...)` (one device, plain
`jax.jit`) `constrain` and `axis_size` are no-ops.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glm5_jax.sharding.layout import ParallelConfig
from glm5_jax.sharding.mesh import build_mesh
from glm5_jax.sharding.rules import Rules, partition_spec


@dataclasses.dataclass(frozen=True)
class Parallelism:
    mesh: Mesh
    rules: Rules
    config: ParallelConfig
    # The collective the "ragged" expert dispatch moves rows with (same contract as the default);
    # `sharding.expert.emulated_ragged_all_to_all` runs that path where XLA lacks the op (XLA:CPU).
    ragged_exchange: Callable = jax.lax.ragged_all_to_all

    @classmethod
    def create(cls, config: ParallelConfig, devices=None) -> Parallelism:
        """Build the mesh of `config` over `devices` (default: all) with its resolved rules."""
        config.validate()
        return cls(build_mesh(config.mesh, config.dcn, devices), config.resolved_rules(), config)

    def spec(self, axes, shape=None) -> PartitionSpec:
        return partition_spec(axes, self.rules, self.mesh, shape)

    def sharding(self, axes, shape=None) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))

    def mesh_axes(self, logical: str) -> tuple[str, ...]:
        """Mesh axes (of size > 1) that a logical name maps to."""
        return tuple(a for a in self.rules.get(logical, ()) if self.mesh.shape[a] > 1)

    def axis_size(self, logical: str) -> int:
        return math.prod(self.mesh.shape[a] for a in self.mesh_axes(logical))

    @property
    def platform(self) -> str:
        """The platform of the mesh's devices ("cpu", "gpu", "tpu"): what the program is compiled for, which
        need not be the process's default backend (`glm5 plan --target tpu:...` compiles on a CPU host)."""
        return self.mesh.devices.flat[0].platform


_active: contextvars.ContextVar[Parallelism | None] = contextvars.ContextVar("glm5_parallelism", default=None)


def current() -> Parallelism | None:
    return _active.get()


@contextlib.contextmanager
def use(par: Parallelism):
    """Make `par` the layout that model code traced inside this block uses (and its mesh JAX's)."""
    token = _active.set(par)
    try:
        with jax.set_mesh(par.mesh):
            yield par
    finally:
        _active.reset(token)


def constrain(x, axes):
    """Pin activation `x` to the sharding its logical `axes` map to (no-op without an active layout)."""
    par = current()
    if par is None or par.mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, par.sharding(axes, x.shape))


def axis_size(logical: str) -> int:
    """How many shards the active layout splits logical axis `logical` into (1 without a layout)."""
    par = current()
    return 1 if par is None else par.axis_size(logical)


def platform() -> str:
    """The platform the program being traced is compiled for: the active layout's devices' ("tpu" for `glm5
    plan --target tpu:...` on a CPU host), else JAX's default backend."""
    par = current()
    return jax.default_backend() if par is None else par.platform


def per_shard(fn, in_axes, out_axes):
    """`fn` run on each device's own shards of its arguments, with no communication inside it.

    in_axes / out_axes: the logical axes of every argument and result (a pytree of results: a matching
    pytree of axes tuples). Each device calls fn on its blocks (a `shard_map` over the whole mesh; mesh axes
    that no dimension maps to replicate), so fn sees local arrays, and inside it no layout is active
    (`constrain` and `axis_size` are no-ops). Without an active layout this is fn itself.
    """
    par = current()
    if par is None or par.mesh.size == 1:
        return fn

    def local(*args):
        token = _active.set(None)
        try:
            return fn(*args)
        finally:
            _active.reset(token)

    def run(*args):
        in_specs = tuple(par.spec(axes, x.shape) for axes, x in zip(in_axes, args, strict=True))
        shapes = jax.eval_shape(local, *args)  # global result shapes: fn is written for any length
        out_specs = jax.tree.map(lambda axes, s: par.spec(axes, s.shape), out_axes, shapes,
                                 is_leaf=lambda a: isinstance(a, tuple))
        # check_vma off: inside a pipeline's vmap over stages (spmd_axis_name) the arguments vary over the
        # stage axis unevenly (positions do not, scores do), which the check rejects; fn communicates with
        # no device, so results are replicated over every axis out_specs leaves out.
        return jax.shard_map(local, mesh=par.mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)(*args)

    return run
