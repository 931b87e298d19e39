"""Feed-forward blocks: dense SwiGLU and the routed MoE (sigmoid router, dropless grouped experts)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from glm5_jax import scopes
from glm5_jax.model.params import RouterBias, make_param, stacked
from glm5_jax.model.quant import fake_int4
from glm5_jax.sharding.runners import runners


class SwiGLU(nnx.Module):
    def __init__(self, cfg, width: int, *, stack: int | None, rngs: nnx.Rngs, axis: str = "mlp"):
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate_proj = make_param(rngs, (cfg.hidden_size, width), ("embed", axis), stack=stack, dtype=pd, std=std)
        self.up_proj = make_param(rngs, (cfg.hidden_size, width), ("embed", axis), stack=stack, dtype=pd, std=std)
        self.down_proj = make_param(rngs, (width, cfg.hidden_size), (axis, "embed"), stack=stack, dtype=pd, std=std)

    def __call__(self, x):
        w = lambda p: p[...].astype(self.dtype)
        with jax.named_scope(scopes.FFN):
            return (jax.nn.silu(x @ w(self.gate_proj)) * (x @ w(self.up_proj))) @ w(self.down_proj)


def route(cfg, logits, bias):
    """Expert indices [T, k] and combine weights [T, k] (float32) from router logits [T, E].

    Selection uses sigmoid scores plus the correction bias (group-limited when n_group > 1); the weights
    are the unbiased scores of the chosen experts, renormalised and scaled by routed_scaling_factor.
    """
    scores = jax.nn.sigmoid(logits)
    choice = scores + bias
    if cfg.n_group > 1:
        grouped = choice.reshape(choice.shape[0], cfg.n_group, -1)
        group_score = jax.lax.top_k(grouped, 2)[0].sum(-1)
        keep = jax.lax.top_k(group_score, cfg.topk_group)[1]
        group_mask = jnp.zeros_like(group_score, dtype=bool).at[jnp.arange(keep.shape[0])[:, None], keep].set(True)
        choice = jnp.where(jnp.repeat(group_mask, grouped.shape[-1], axis=1), choice, -jnp.inf)
    idx = jax.lax.top_k(choice, cfg.num_experts_per_tok)[1]
    weights = jnp.take_along_axis(scores, idx, axis=-1)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return idx, weights * cfg.routed_scaling_factor


def sequence_balance(scores, idx, mask, n_experts: int):
    """Sequence-level balance terms (DeepSeek-V3), summed over the batch rows.

    scores [B, L, E] sigmoid router scores (float32); idx [B, L, k] selected experts; mask [B, L] real
    tokens. Per row: sum_i f_i * P_i with f_i = E / (k * T) * (tokens of the row selecting i) and P_i the
    row's mean of s_i / sum_j s_j, T its real tokens. Rows without real tokens add 0. Only P carries
    gradient (f counts selections).
    """
    B, _, k = idx.shape
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(axis=1), 1.0)  # [B]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None, None], idx.shape)
    counts = jnp.zeros((B, n_experts), jnp.float32).at[rows, idx].add(jnp.broadcast_to(m[..., None], idx.shape))
    f = counts * (n_experts / k) / n[:, None]
    probs = scores / scores.sum(axis=-1, keepdims=True)
    P = jnp.einsum("ble,bl->be", probs, m) / n[:, None]
    return jnp.sum(f * P)


def expert_matmul_kind(setting: str, platform: str, stages: int = 1, experts: int = 1) -> str:
    """The grouped matmul the MoE runs: "ragged_dot" or "tiled", for the config's `expert_matmul` setting on
    devices of `platform` ("cpu", "gpu", "tpu") with `stages` pipeline stages and `experts` expert shards.

    `auto` is ragged_dot on TPU (a grouped GEMM) and tiled on CPU and GPU, whose compilers in jax 0.10 turn
    ragged_dot into a dot over every local expert with the other experts' rows masked (E times the work, and
    E masked copies of the rows; docs/plan.md). Under pipeline x expert parallelism `auto` takes ragged_dot
    there too: jax 0.10 cannot differentiate the tiled loop inside the expert shard_map under the pipeline's
    vmap (a varying-axes mismatch in the scan's cotangents), so `layout_check` refuses an explicit "tiled"
    there. A pure function (no JAX): the analytic FLOP count (glm5_jax/accounting/analytic.py) asks it too.
    """
    if setting != "auto":
        return setting
    return "tiled" if platform in ("cpu", "gpu") and not (stages > 1 and experts > 1) else "ragged_dot"


class TiledGroups:
    """Rows sorted by group, laid out so each tile of `tile` rows belongs to one group.

    The portable grouped matmul: every group is padded to whole tiles, and a loop over tiles multiplies
    each by its own group's matrix, so the work is the grouped product plus at most one partial tile per
    group. Used where `jax.lax.ragged_dot` has no grouped kernel (XLA:CPU and XLA:GPU compute it densely, E
    times the work).
    """

    def __init__(self, sizes, n_rows: int, tile: int):
        padded = -(-sizes // tile) * tile
        starts, padded_starts = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
        group = jnp.repeat(jnp.arange(sizes.shape[0]), sizes, total_repeat_length=n_rows)
        self.position = padded_starts[group] + jnp.arange(n_rows) - starts[group]  # row -> padded slot
        self.n_tiles = -(-(n_rows + sizes.shape[0] * (tile - 1)) // tile)
        ends = jnp.cumsum(padded)
        self.tile_group = jnp.minimum(jnp.searchsorted(ends, jnp.arange(self.n_tiles) * tile, side="right"),
                                      sizes.shape[0] - 1)
        self.tile = tile

    def pad(self, rows):
        out = jnp.zeros((self.n_tiles * self.tile, rows.shape[1]), rows.dtype).at[self.position].set(rows)
        return out.reshape(self.n_tiles, self.tile, rows.shape[1])

    def unpad(self, tiles):
        return tiles.reshape(-1, tiles.shape[-1])[self.position]

    def matmul(self, tiles, w):
        # Rematerialised so the backward pass re-reads each tile's expert matrix from `w` instead of
        # keeping a gathered copy per tile (n_tiles x D x F: ~30 GiB per matrix at 744B scale).
        return jax.lax.map(jax.checkpoint(lambda a: a[0] @ w[a[1]]), (tiles, self.tile_group))


def grouped_experts(x, idx, weights, gate, up, down, n_experts: int, tile: int = 0):
    """Dropless expert compute: sort token copies by expert, run each expert on its rows only.

    x [T, D]; idx, weights [T, k]; gate/up [E, D, F]; down [E, F, D]. With tile == 0,
    `jax.lax.ragged_dot` multiplies each contiguous group of rows by its expert's matrix (a grouped GEMM
    on GPU/TPU); with tile > 0 the portable `TiledGroups` loop does. Either way no token meets an
    expert it was not sent to.
    """
    k = idx.shape[1]
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    rows = x[order // k]
    sizes = jnp.bincount(flat, length=n_experts).astype(jnp.int32)
    with jax.named_scope(scopes.ROUTED_EXPERTS):
        if tile:
            groups = TiledGroups(sizes, rows.shape[0], tile)
            xt = groups.pad(rows)
            h = jax.nn.silu(groups.matmul(xt, gate)) * groups.matmul(xt, up)
            y = groups.unpad(groups.matmul(h, down))
        else:
            h = jax.nn.silu(jax.lax.ragged_dot(rows, gate, sizes)) * jax.lax.ragged_dot(rows, up, sizes)
            y = jax.lax.ragged_dot(h, down, sizes)
    y = y * weights.reshape(-1)[order][:, None].astype(y.dtype)
    out = y[jnp.argsort(order)]  # back to token-major order
    return out.reshape(x.shape[0], k, -1).sum(axis=1), sizes


class MoE(nnx.Module):
    def __init__(self, cfg, *, stack: int | None, rngs: nnx.Rngs):
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.cfg, self.dtype = cfg, jnp.dtype(cfg.dtype)
        E, D, F = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate = make_param(rngs, (D, E), ("embed", "experts"), stack=stack, dtype=jnp.float32, std=std)
        shape, axes = stacked((E,), ("experts",), stack)
        self.e_score_correction_bias = RouterBias(jnp.zeros(shape, jnp.float32), logical_axes=axes)
        self.experts_gate = make_param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), stack=stack, dtype=pd,
                                       std=std)
        self.experts_up = make_param(rngs, (E, D, F), ("experts", "embed", "expert_mlp"), stack=stack, dtype=pd,
                                     std=std)
        self.experts_down = make_param(rngs, (E, F, D), ("experts", "expert_mlp", "embed"), stack=stack, dtype=pd,
                                       std=std)
        self.shared_experts = SwiGLU(cfg, cfg.shared_intermediate_size, stack=stack, rngs=rngs)

    def __call__(self, x, segment_ids=None, *, with_balance: bool = False):
        """x [B, L, D] -> (output [B, L, D], tokens processed per expert [E]) (+ balance terms).

        Every token sends num_experts_per_tok copies; with a capacity bound (expert parallelism) copies
        that overflow are dropped, so dropped copies = tokens * k - sum(load). With `with_balance` a third
        result is the `sequence_balance` sum (from the routing before any drop), counting tokens with
        segment id > 0 (all tokens without segment_ids).
        """
        cfg = self.cfg
        flat = x.reshape(-1, x.shape[-1])
        with jax.named_scope(scopes.ROUTER):
            logits = flat.astype(jnp.float32) @ self.gate[...]
            idx, weights = route(cfg, logits, self.e_score_correction_bias[...])
        w = lambda p: p[...].astype(self.dtype)
        if cfg.qat == "int4":  # once per forward, groups along each matrix's input dim ([E, in, out])
            w = lambda p: fake_int4(p[...].astype(self.dtype), cfg.qat_group_size, -2)
        run = runners()
        kind = expert_matmul_kind(cfg.expert_matmul, run.platform, run.pipeline_stages, run.expert_shards)
        experts = run.experts(functools.partial(grouped_experts, tile=cfg.expert_tile if kind == "tiled" else 0))
        routed, load = experts(flat, idx, weights, w(self.experts_gate), w(self.experts_up), w(self.experts_down))
        out = routed.reshape(x.shape) + self.shared_experts(x)
        if not with_balance:
            return out, load
        mask = jnp.ones(x.shape[:2], bool) if segment_ids is None else segment_ids > 0
        balance = sequence_balance(jax.nn.sigmoid(logits).reshape(*x.shape[:2], -1),
                                   idx.reshape(*x.shape[:2], -1), mask, cfg.n_routed_experts)
        return out, load, balance
