"""The two grouped expert matmuls against a direct per-token implementation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glm5_jax.model.moe import TiledGroups, grouped_experts


def direct(x, idx, weights, gate, up, down):
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            h = jax.nn.silu(x[t] @ gate[e]) * (x[t] @ up[e])
            out[t] += weights[t, j] * np.asarray(h @ down[e])
    return out


@pytest.mark.parametrize("tile", [0, 1, 4, 64], ids=["ragged_dot", "tile1", "tile4", "tile64"])
def test_grouped_experts_equal_direct_computation(tile):
    T, D, F, E, k = 37, 16, 8, 6, 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = np.asarray(jax.random.normal(keys[0], (T, D)))
    gate, up = (np.asarray(jax.random.normal(kk, (E, D, F))) for kk in keys[1:3])
    down = np.asarray(jax.random.normal(keys[3], (E, F, D)))
    # skewed routing with an expert nobody picks (5), so empty and multi-tile groups both occur
    idx = np.stack([np.arange(T) % 3, 3 + (np.arange(T) % 2)], 1).astype(np.int32)
    weights = np.asarray(jax.random.uniform(keys[4], (T, k)))
    out, load = jax.jit(grouped_experts, static_argnums=(6, 7))(x, idx, weights, gate, up, down, E, tile)
    np.testing.assert_allclose(out, direct(x, idx, weights, gate, up, down), rtol=1e-5, atol=1e-5)
    assert load.tolist() == np.bincount(idx.ravel(), minlength=E).tolist()


def test_tiled_layout_bounds_the_work():
    """The tiled loop runs at most rows + one partial tile per expert, however the tokens are routed."""
    T, k, E, tile = 1000, 8, 64, 16
    for sizes in (np.full(E, T * k // E), np.eye(E, dtype=int)[3] * T * k, np.array([T * k - 5] + [0] * (E - 2) + [5])):
        groups = TiledGroups(jnp.asarray(sizes, jnp.int32), T * k, tile)
        assert groups.n_tiles * tile <= T * k + E * tile
        slots = np.asarray(groups.position)
        assert len(set(slots.tolist())) == T * k  # every row its own slot
        # each row's tile is assigned to the row's own expert
        expert_of_row = np.repeat(np.arange(E), sizes)
        assert (np.asarray(groups.tile_group)[slots // tile] == expert_of_row).all()
