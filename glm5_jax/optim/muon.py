"""Muon with per-leaf matrix views, including GLM-5's Muon-Split (per-head, per-block orthogonalisation).

The maths is `optax.contrib.muon`'s: Nesterov momentum with bias correction, Newton-Schulz on the
Frobenius-normalised momentum (optax's own `orthogonalize_via_newton_schulz`), then the shape scaling
(`consistent_rms * sqrt(max(fan_in, fan_out))`, Moonlight). What optax cannot express is a leaf whose
output axis is cut into unequal blocks that are orthogonalised apart (W^UK | W^UV in `kv_b_proj`:
192 | 256 columns per head), so this transformation owns the momentum and hands each block to optax.
The momentum keeps the parameters' tree structure and shapes, so optimizer state shards like the params.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

# Not re-exported by optax.contrib (0.2.8); optax's own NorMuon imports it from here too.
from optax.contrib._muon import orthogonalize_via_newton_schulz

from glm5_jax import scopes

QUINTIC = (3.4445, -4.7750, 2.0315)  # optax.contrib.muon's default Newton-Schulz coefficients


@dataclasses.dataclass(frozen=True)
class MatrixSpec:
    """How Muon sees one parameter: matrices [fan-in axes, output axes]; every other axis is a batch axis.

    `split_axis`/`segments`: the axis (one of `output`) is cut into consecutive blocks of these sizes and
    each block is orthogonalised on its own (with its own fan-out in the RMS scaling).
    """

    reduction: tuple[int, ...]
    output: tuple[int, ...]
    split_axis: int | None = None
    segments: tuple[int, ...] = ()

    @property
    def dimension_numbers(self) -> MuonDimensionNumbers:
        return MuonDimensionNumbers(self.reduction, self.output)

    def blocks(self, shape) -> list[tuple[int, ...]]:
        """Shape of each separately orthogonalised block (the whole shape when unsplit)."""
        if self.split_axis is None:
            return [tuple(shape)]
        assert sum(self.segments) == shape[self.split_axis], (shape, self)
        return [tuple(size if a == self.split_axis else d for a, d in enumerate(shape)) for size in self.segments]

    def matrices(self, shape) -> list[tuple[int, int, int]]:
        """(count, fan_in, fan_out) of the Newton-Schulz matrices, per block."""
        out = []
        for block in self.blocks(shape):
            fan_in = math.prod(block[a] for a in self.reduction)
            fan_out = math.prod(block[a] for a in self.output)
            out.append((math.prod(block) // (fan_in * fan_out), fan_in, fan_out))
        return out


def shape_scale(fan_in: int, fan_out: int, consistent_rms: float | None) -> float:
    """optax's shape scaling: Moonlight's `rms * sqrt(max(fan_in, fan_out))`, or Jordan's width scaling."""
    if consistent_rms is None:
        return math.sqrt(max(1.0, fan_out / fan_in))
    return consistent_rms * math.sqrt(max(fan_in, fan_out))


def orthogonalize(x: jax.Array, spec: MatrixSpec, *, ns_coeffs=QUINTIC, ns_steps: int = 5, eps: float = 1e-8,
                  consistent_rms: float | None = 0.2) -> jax.Array:
    """Newton-Schulz-orthogonalise every matrix (and block) of `x` and apply the shape scaling."""
    coeffs = jnp.asarray(ns_coeffs, jnp.float32)
    pieces, start = [], 0
    for block, (_, fan_in, fan_out) in zip(spec.blocks(x.shape), spec.matrices(x.shape)):
        if spec.split_axis is not None:
            size = block[spec.split_axis]
            piece, start = jax.lax.slice_in_dim(x, start, start + size, axis=spec.split_axis), start + size
        else:
            piece = x
        o = _newton_schulz_per_matrix(piece, spec, coeffs, ns_steps, eps)
        pieces.append(o * shape_scale(fan_in, fan_out, consistent_rms))
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=spec.split_axis)


def _newton_schulz_per_matrix(x, spec: MatrixSpec, coeffs, ns_steps: int, eps: float):
    """optax's Newton-Schulz on every matrix of x, one nested `vmap` per batch axis.

    optax reshapes all batch axes into one, which a sharded layout cannot follow (merging the `layers`
    and `experts` axes drops the expert sharding, so every expert matrix would be gathered on every
    device); vmapping each batch axis on its own keeps them batch dimensions of the products, still
    sharded. The outermost batch axis (stacked layers) runs as a loop, so the iteration's temporaries
    exist for one layer at a time (all 75 MoE layers at once needed ~40 GiB more per device at 744B).
    """
    batch = [a for a in range(x.ndim) if a not in spec.reduction + spec.output]
    order = batch + list(spec.reduction) + list(spec.output)
    y = jnp.transpose(x, order)
    fan_in = math.prod(x.shape[a] for a in spec.reduction)
    matrix_shape = y.shape[len(batch):]

    def one(m):
        m2 = m.reshape(fan_in, -1)
        return orthogonalize_via_newton_schulz(m2, coeffs, ns_steps, "frobenius", eps).reshape(matrix_shape)

    for _ in batch[1:]:
        one = jax.vmap(one)
    if batch:  # the outermost batch axis (stacked layers) in a loop: temporaries of one layer at a time
        outer = one
        one = lambda y: jax.lax.map(outer, y)
    with jax.named_scope(scopes.NEWTON_SCHULZ):
        return jnp.transpose(one(y), [order.index(a) for a in range(x.ndim)])


class MuonSplitState(NamedTuple):
    count: jax.Array  # int32 scalar: steps taken
    mu: optax.Updates  # momentum, same tree and shapes as the parameters


def scale_by_muon_split(spec_of: Callable[[tuple], MatrixSpec], *, beta: float = 0.95, nesterov: bool = True,
                        ns_coeffs=QUINTIC, ns_steps: int = 5, eps: float = 1e-8,
                        consistent_rms: float | None = 0.2, mu_dtype=None) -> optax.GradientTransformation:
    """Muon's direction: momentum, Newton-Schulz per `spec_of(key_path)`, shape scaling.

    Equal to `optax.contrib.scale_by_muon` followed by optax's `scale_by_shape` when no spec splits a
    leaf. Learning rate and weight decay are chained after it (see `make_optimizer`).
    """

    def init_fn(params):
        return MuonSplitState(jnp.zeros([], jnp.int32), optax.tree.zeros_like(params, dtype=mu_dtype))

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        if nesterov:  # optax's bias-corrected Nesterov form, so updates match optax.contrib.muon exactly
            mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g,
                                  optax.tree.bias_correction(mu, beta, optax.safe_increment(count)),
                                  optax.tree.bias_correction(updates, beta, count))
        else:
            mu_hat = optax.tree.bias_correction(mu, beta, count)
        out = jax.tree_util.tree_map_with_path(
            lambda path, m: orthogonalize(m, spec_of(path), ns_coeffs=ns_coeffs, ns_steps=ns_steps, eps=eps,
                                          consistent_rms=consistent_rms), mu_hat)
        return out, MuonSplitState(count, optax.tree.cast(mu, mu_dtype))

    return optax.GradientTransformation(init_fn, update_fn)
