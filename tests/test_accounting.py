"""glm5_jax.accounting's compiled-FLOP counter: loops at their trip counts, products attributed to the
`glm5_jax.scopes` names the program was traced in (never to Python function names), runtime trip counts by
scope."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from glm5_jax import scopes
from glm5_jax.accounting import compiled as hlo
from glm5_jax.accounting import loops, parts

MATMUL = 2 * 8 * 32 * 32  # one [8, 32] @ [32, 32]


def _scan(x, ws):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]


def test_cost_analysis_counts_a_loop_body_once_and_the_walker_counts_every_trip():
    compiled = jax.jit(_scan).lower(jnp.ones((8, 32)), jnp.ones((5, 32, 32))).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    assert MATMUL <= cost["flops"] < 2 * MATMUL  # XLA: the body once (plus a few scalar ops)
    count = hlo.count_flops(compiled.as_text())
    assert count.flops == 5 * MATMUL
    assert count.once == MATMUL
    assert count.loops == 1 and count.dynamic == []
    assert sum(count.by_source.values()) == count.flops == count.by_scope[hlo.UNSCOPED]


def test_nested_and_dynamic_loops_by_scope():
    def nested(x, ws):  # 3 outer trips of a 5-trip scan
        return jax.lax.fori_loop(0, 3, lambda i, c: _scan(c, ws), x)

    def dynamic(x, w, n):  # a loop whose count is an argument, inside the accumulation scope
        with jax.named_scope(scopes.ACCUMULATE):
            return jax.lax.fori_loop(0, n, lambda i, c: jnp.tanh(c @ w), x)

    x, ws = jnp.ones((8, 32)), jnp.ones((5, 32, 32))
    count = hlo.count_flops(jax.jit(nested).lower(x, ws).compile().as_text())
    assert count.flops == 15 * MATMUL and count.loops == 2
    text = jax.jit(dynamic).lower(x, ws[0], 7).compile().as_text()
    assert hlo.count_flops(text).flops == MATMUL  # no trip count known: once, and listed
    seen = []
    counted = hlo.count_flops(text, lambda scope: seen.append(scope) or 7)
    assert counted.flops == 7 * MATMUL and seen[0] == scopes.ACCUMULATE
    assert [(d["scope"], d["trips"], d["executions"]) for d in counted.dynamic] == [(scopes.ACCUMULATE, 7, 1.0)]
    assert counted.by_scope == {scopes.ACCUMULATE: 7 * MATMUL}


def test_topk_merge_trips_by_hand():
    # 128 positions, blocks of 16 queries, chunks of 16 keys: block b scans chunks 0..b, b merges.
    assert loops.topk_merge_trips(128, 16, 16) == sum(range(8)) / 8
    # two context shards: shard 1's blocks start at position 64 (merges 4..7)
    assert loops.topk_merge_trips(128, 16, 16, context=2) == sum(range(8)) / 8
    # chunks of 32 (index_topk 32): blocks 0..7 need chunks 1, 1, 2, 2, 3, 3, 4, 4
    assert loops.topk_merge_trips(128, 32, 16) == (0 + 0 + 1 + 1 + 2 + 2 + 3 + 3) / 8


def _layer(w_attn, w_exp, x, attend, experts):
    with jax.named_scope(scopes.ATTENTION):
        x = attend(x, w_attn)
    with jax.named_scope(scopes.PIPELINE):
        return experts(x, w_exp)


def _mix(x, w):
    return jnp.tanh(x @ w)


def _grouped(x, ws):  # 4 experts' products in a loop, as the tiled expert loop runs them
    with jax.named_scope(scopes.ROUTED_EXPERTS):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]


def _renamed_mix(x, w):  # the same math as `_mix` and `_grouped` under other Python names
    return jnp.tanh(x @ w)


def _renamed_grouped(x, ws):
    with jax.named_scope(scopes.ROUTED_EXPERTS):
        return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, ws)[0]


def _attribute(attend, experts) -> hlo.Count:
    loss = lambda w, v, x: jnp.sum(_layer(w, v, x, attend, experts))
    args = jnp.ones((32, 32)), jnp.ones((4, 32, 32)), jnp.ones((8, 32))
    return hlo.count_flops(jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text())


def test_attribution_is_by_scope_whatever_the_functions_are_called():
    a, b = _attribute(_mix, _grouped), _attribute(_renamed_mix, _renamed_grouped)
    assert {k.split(":")[-1] for k in a.by_source} != {k.split(":")[-1] for k in b.by_source}  # renamed
    assert a.by_scope == b.by_scope and a.flops == b.flops
    # forward: 1 + 4 products; backward: the weight gradient of the first (x is a constant), both gradients
    # of the other 4
    experts = f"{scopes.PIPELINE}/{scopes.ROUTED_EXPERTS}"
    assert a.by_scope == {scopes.ATTENTION: MATMUL, f"{scopes.ATTENTION} (backward)": MATMUL,
                          experts: 4 * MATMUL, f"{experts} (backward)": 8 * MATMUL}
    by_part = parts.by_part(a.by_scope)
    assert by_part["attention, indexer"] == 2 * MATMUL and by_part[parts.part(scopes.ROUTED_EXPERTS)] == 12 * MATMUL
    assert sum(by_part.values()) == a.flops and by_part[parts.OTHER] == 0
    assert parts.within(a.by_scope, scopes.PIPELINE) == 12 * MATMUL
    assert parts.within(a.by_scope, scopes.PIPELINE, but=scopes.ROUTED_EXPERTS) == 0


def test_scope_names_in_a_name_stack():
    stack = f"jit(step)/jvp({scopes.ACCUMULATE})/while/body/transpose(jvp({scopes.ATTENTION}))/dot_general"
    assert hlo.declared(stack) == [scopes.ACCUMULATE, scopes.ATTENTION]
    assert hlo.scope_key(stack) == f"{scopes.ACCUMULATE}/{scopes.ATTENTION} (backward)"
    assert hlo.scope_key("jit(step)/jit(glm5_attention)/dot_general") == hlo.UNSCOPED  # a function's name
    assert parts.part(f"{scopes.ATTENTION}/{scopes.INDEXER}/{scopes.TOPK_MERGE}") == "attention, indexer"
    assert parts.part(f"{scopes.PIPELINE}/{scopes.ROUTED_EXPERTS} (backward)") == parts.part(scopes.ROUTED_EXPERTS)


def test_flash_key_trips_by_hand():
    # 128 positions in blocks of 16: query block b computes key blocks 0..b (one document a row)
    assert loops.flash_key_trips(128, 16) == sum(range(1, 9)) / 8
    # two context shards: shard 1's blocks are 4..7 of the whole row, so they see 5..8 key blocks
    assert loops.flash_key_trips(128, 16, context=2) == (sum(range(1, 5)) + sum(range(5, 9))) / 8


def test_dense_attention_counted_at_its_key_trips_equals_the_analytic_count():
    """The compiled dense step, its key-block loops at `loops.flash_key_trips`: the loop bodies do what the
    analytic count says, pair for pair (forward, the block's recompute, the backward with its scores again:
    B P H (18C + 10dr)), and the whole attention part is the analytic attention within 2% (the latent
    projections' input gradient is all the difference)."""
    from glm5_jax.accounting import analytic as F
    from glm5_jax.plan.measure import run

    r = run("tiny", ["num_nextn_predict_layers=0", "remat_policy=none"], devices=2, seq_len=128, global_batch=2,
            loss_overrides=["dsa=dense"])
    cfg, count = r.inputs.cfg, r.counted
    assert {d["scope"] for d in count.dynamic} == {scopes.FLASH_KEYS}
    assert all(d["trips"] == loops.flash_key_trips(128, cfg.attention_query_block) for d in count.dynamic)
    keys = sum(v for k, v in count.by_scope.items() if scopes.FLASH_KEYS in k)
    pairs = F.dense_pairs(128, 1, cfg.attention_query_block)
    C, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    per_device = 2 * pairs * cfg.num_attention_heads * (18 * C + 10 * dr) * cfg.num_hidden_layers / 2
    assert keys == per_device
    analytic = sum(f.per_device for f in r.flops if "attention" in f.name)
    assert 0.98 < parts.by_part(count.by_scope)["attention, indexer"] / analytic <= 1.0, analytic
