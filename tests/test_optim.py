"""Muon-Split optimizer: per-head orthogonality, equality with optax's Muon, routing of every parameter,
sharded == single-device, schedules and the batch-size warm-up."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from glm5_jax import config
from glm5_jax.dotted import dotted_name
from glm5_jax.errors import ConfigError
from glm5_jax.model import GLM5
from glm5_jax.optim import (
    OptimizerConfig,
    from_dict,
    learning_rate_schedule,
    make_optimizer,
    param_routes,
    route,
    scale_by_muon_split,
    state_shardings,
    summary,
)
from glm5_jax.optim.optimizer import lookup
from glm5_jax.train.setup import routing_table
from tests.conftest import run_cli

# 5 quintic Newton-Schulz steps map a matrix's singular values (after Frobenius normalisation, for
# normalised values >= 0.005) into this band: measured 0.6818 .. 1.1344 (scalar map on a fine grid and
# random Gaussian matrices agree).
NS_BAND = (0.68, 1.14)


def build(overrides=()):
    """A tiny model with random values filled in by NumPy (no per-op compiles of an eager init)."""
    cfg = config.load("tiny", overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GLM5(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype), state)
    return cfg, nnx.merge(graphdef, state)


@pytest.fixture(scope="module")
def tiny():
    return build()


@pytest.fixture(scope="module")
def tiny_moe():
    """The tiny preset as one stack of 4 MoE layers without MTP: every kind of parameter and sharded axis,
    a third of the arrays (so optimizer steps compile in seconds on a busy 2-core machine)."""
    return build(["first_k_dense_replace=0", "num_nextn_predict_layers=0"])


def random_like(tree, seed=1):
    rng = np.random.default_rng(seed)  # NumPy: eager jax.random would compile a kernel per shape
    return jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def compiled(fn, *args, **jit_kwargs):
    """jit + compile ahead of time (tests/conftest.py turns LLVM optimisation off for the whole suite)."""
    return jax.jit(fn, **jit_kwargs).lower(*args).compile()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ----- config -----

def test_config_defaults_and_errors():
    c = from_dict({})
    assert (c.momentum, c.nesterov, c.ns_steps, c.ns_coeffs, c.consistent_rms, c.weight_decay) == (
        0.95, True, 5, (3.4445, -4.7750, 2.0315), 0.2, 0.1)
    assert (c.adam_b1, c.adam_b2, c.adam_eps, c.decoupled_adam_weight_decay) == (0.9, 0.95, 1e-8, 0.1)
    assert (c.split_heads, c.split_qk_rope, c.split_o_proj) == (True, False, False)
    assert from_dict({"ns_coeffs": [[1, 2, 3]] * 5}).ns_coeffs == ((1, 2, 3),) * 5
    for values, message in [
        ({"split_o_prj": True}, "optimizer.split_o_prj: unknown optimizer config key (did you mean 'optimizer.split_o_proj'?)"),
        ({"schedule": "cos"}, "optimizer.schedule: must be one of cosine, linear, constant, wsd; got 'cos'"),
        ({"momentum": 1.0}, "optimizer.momentum: must be in [0, 1); got 1.0"),
        ({"ns_coeffs": [1, 2]}, "optimizer.ns_coeffs: must be 3 numbers"),
        ({"split_heads": "yes"}, "optimizer.split_heads: must be true or false; got 'yes'"),
        ({"schedule": "wsd", "warmup_steps": 10, "decay_steps": 995}, "optimizer.warmup_steps: warm-up + decay_steps"),
    ]:
        with pytest.raises(ConfigError) as e:
            from_dict(values)
        assert str(e.value).startswith(message), str(e.value)


# ----- routing -----

def test_routing_rules(tiny):
    cfg, model = tiny
    opt = OptimizerConfig()
    routes = param_routes(model, cfg, opt)
    by = {name: (r.optimizer, r.spec) for name, r in routes.items()}
    assert "layers.1.mlp.e_score_correction_bias" not in by  # a RouterBias, not an nnx.Param
    for name in ("embed_tokens", "lm_head", "norm.weight", "layers.0.input_layernorm.weight",
                 "layers.0.self_attn.indexer.k_norm.bias", "layers.0.self_attn.indexer.k_norm.weight",
                 "mtp.shared_head_norm.weight", "mtp.enorm.weight", "layers.0.self_attn.kv_a_layernorm.weight"):
        assert by[name] == ("adamw", None), name
    spec = lambda name: by[name][1]
    assert all(o == "muon" for name, (o, _) in by.items() if name not in (
        "embed_tokens", "lm_head") and "norm" not in name)
    # q_b_proj [layers, q_lora, heads, head_dim]: per head, nope and rope together.
    assert (spec("layers.0.self_attn.q_b_proj").reduction, spec("layers.0.self_attn.q_b_proj").output) == ((1,), (3,))
    assert spec("layers.0.self_attn.q_b_proj").segments == ()
    # kv_b_proj: per head, W^UK (16 columns) and W^UV (16) apart.
    kv = spec("layers.0.self_attn.kv_b_proj")
    assert (kv.reduction, kv.output, kv.split_axis, kv.segments) == ((1,), (3,), 3, (16, 16))
    assert kv.matrices((2, 32, 4, 32)) == [(8, 32, 16), (8, 32, 16)]
    # o_proj whole by default: [heads*head_dim, embed]; experts and layers are batch axes; router gate is Muon.
    assert (spec("layers.0.self_attn.o_proj").reduction, spec("layers.0.self_attn.o_proj").output) == ((1, 2), (3,))
    assert spec("layers.1.mlp.experts_down").matrices((2, 8, 32, 64)) == [(16, 32, 64)]
    assert spec("layers.1.mlp.gate").matrices((2, 64, 8)) == [(2, 64, 8)]
    assert spec("mtp.layer.self_attn.indexer.wq_b").matrices((48, 8, 16)) == [(1, 48, 128)]
    # Switches.
    q_shape, q_axes = (2, 48, 4, 24), ("layers", "q_lora", "heads", "head_dim")
    o_shape, o_axes = (2, 4, 16, 64), ("layers", "heads", "head_dim", "embed")
    r = route("layers.0.self_attn.q_b_proj", q_shape, q_axes, cfg, OptimizerConfig(split_qk_rope=True))
    assert r.matrices() == [(8, 48, 16), (8, 48, 8)]
    r = route("layers.0.self_attn.o_proj", o_shape, o_axes, cfg, OptimizerConfig(split_o_proj=True))
    assert r.matrices() == [(8, 16, 64)]
    plain = OptimizerConfig(split_heads=False, split_o_proj=True)
    assert route("layers.0.self_attn.q_b_proj", q_shape, q_axes, cfg, plain).matrices() == [(2, 48, 96)]
    assert route("layers.0.self_attn.o_proj", o_shape, o_axes, cfg, plain).matrices() == [(2, 64, 64)]
    assert route("x.mlp.e_score_correction_bias", (2, 8), ("layers", "experts"), cfg, plain).optimizer == "frozen"
    adamw_only = OptimizerConfig(matrix_optimizer="adamw")
    assert route("layers.1.mlp.gate", (2, 64, 8), ("layers", "embed", "experts"), cfg, adamw_only).optimizer == "adamw"


def test_routing_table_744b_accounts_for_every_parameter():
    cfg = config.load("glm5-744b")
    routes = routing_table(cfg)
    got = summary(routes)
    # Independently from the config formulas (the released config's shapes, docs/model.md).
    D, H, V, E = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size, cfg.n_routed_experts
    ql, kl, nope, rope, v = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    ih, idim, mi, I = cfg.index_n_heads, cfg.index_head_dim, cfg.moe_intermediate_size, cfg.intermediate_size
    attn_muon = D * ql + ql * H * (nope + rope) + D * (kl + rope) + kl * H * (nope + v) + H * v * D \
        + ql * ih * idim + D * idim + D * ih
    layer_adamw = ql + kl + 2 * idim + 2 * D
    moe_muon = D * E + 3 * E * D * mi + 3 * D * mi * cfg.n_shared_experts
    n_dense, n_moe = 3, 75
    assert (cfg.first_k_dense_replace, cfg.num_hidden_layers, cfg.has_mtp) == (n_dense, n_dense + n_moe, True)
    muon = n_dense * (attn_muon + 3 * D * I) + (n_moe + 1) * (attn_muon + moe_muon) + 2 * D * D
    adamw = (n_dense + n_moe + 1) * layer_adamw + 2 * V * D + D + 3 * D
    frozen = (n_moe + 1) * E
    per_layer_matrices = 6 + 3 * H  # q_a, kv_a, o, wq_b, wk, weights_proj + H q heads + 2H k/v blocks
    matrices = n_dense * (per_layer_matrices + 3) + (n_moe + 1) * (per_layer_matrices + 1 + 3 * E + 3) + 1
    assert got == {
        "muon": {"arrays": 2 * (8 + 7) + 8 + 3 + 1, "matrices": matrices, "params": muon},
        "adamw": {"arrays": 3 * 6 + 3 + 3, "matrices": 0, "params": adamw},
        "frozen": {"arrays": 2, "matrices": 0, "params": frozen},
    }
    assert (muon, adamw, frozen, matrices) == (751_959_736_320, 1_904_383_232, 19_456, 74_324)
    total = sum(s["params"] for s in got.values())
    assert total == sum(r.size for r in routes) == 753_864_139_008  # "754B with MTP"
    mtp = sum(r.size for r in routes if r.name.startswith("mtp."))
    assert round((total - mtp) / 1e9) == 744


def test_cli_optimizer_table(capsys):
    assert run_cli("optimizer", "--config", "tiny", "--opt", "split_o_proj=true") == 0
    out = capsys.readouterr().out
    assert "layers[0-1].self_attn.kv_b_proj" in out and "32x16 | 32x16" in out and "frozen" in out
    assert run_cli("optimizer", "--config", "tiny", "--opt", "split_heads=maybe") == 2
    assert "optimizer.split_heads: must be true or false" in capsys.readouterr().err


# ----- Muon-Split maths -----

def test_per_head_orthogonality(tiny):
    cfg, _ = tiny
    shapes = {"layers.0.self_attn.q_b_proj": ((2, 48, 4, 24), ("layers", "q_lora", "heads", "head_dim")),
              "layers.0.self_attn.kv_b_proj": ((2, 32, 4, 32), ("layers", "kv_lora", "heads", "head_dim"))}
    head_scale = jnp.asarray([1.0, 1e-1, 1e-2, 1e-3])[:, None]  # heads of very different gradient scale
    grads = {n: jax.random.normal(jax.random.key(i), s) * head_scale for i, (n, (s, _)) in enumerate(shapes.items())}

    def update(opt):
        specs = {n: route(n, s, a, cfg, opt).spec for n, (s, a) in shapes.items()}
        tx = scale_by_muon_split(lambda path: specs[dotted_name(path)], consistent_rms=0.2)
        return jax.jit(lambda g: tx.update(g, tx.init(g))[0])(grads)

    split, plain = update(OptimizerConfig()), update(OptimizerConfig(split_heads=False))

    def head_singular_values(u, cols, fan_in):  # [layers, fan_in, heads, head_dim] -> per (layer, head) block
        blocks = u[..., cols].transpose(0, 2, 1, 3)
        return np.linalg.svd(np.asarray(blocks), compute_uv=False) / (0.2 * math.sqrt(max(fan_in, len(cols))))

    q, kv = "layers.0.self_attn.q_b_proj", "layers.0.self_attn.kv_b_proj"
    blocks = [(q, list(range(24)), 48), (kv, list(range(16)), 32), (kv, list(range(16, 32)), 32)]
    for name, cols, fan_in in blocks:
        s = head_singular_values(split[name], cols, fan_in)
        assert NS_BAND[0] <= s.min() and s.max() <= NS_BAND[1], (name, s.min(), s.max())
    for name in (q, kv):
        assert not np.allclose(split[name], plain[name], atol=1e-3)
    # Plain Muon orthogonalises all heads together: the small-gradient heads get tiny updates.
    s = np.linalg.svd(np.asarray(plain[q].transpose(0, 2, 1, 3)[:, 3]), compute_uv=False) / (0.2 * math.sqrt(96))
    assert s.max() < NS_BAND[0]


def test_split_off_equals_optax_muon_and_router_bias_frozen(tiny_moe):
    """Plain Muon (split off) == optax.contrib.muon with the same dimension numbers, on every nnx.Param."""
    cfg, model = tiny_moe
    opt = OptimizerConfig(split_heads=False, schedule="constant", learning_rate=1e-2, adam_nesterov=True)
    full = nnx.state(model)  # includes the RouterBias leaves: they must get a zero update
    params = nnx.state(model, nnx.Param)
    tx = make_optimizer(opt, cfg, full)
    routes = param_routes(params, cfg, opt)
    dims = jax.tree_util.tree_map_with_path(
        lambda p, _: lookup(routes, p).spec.dimension_numbers if lookup(routes, p).spec else None, params)
    # optax's own Muon also runs NAdamW (nesterov) for non-matrix leaves, hence adam_nesterov=True above.
    ref = optax.contrib.muon(1e-2, adam_b1=0.9, adam_b2=0.95, weight_decay=0.1, adam_weight_decay=0.1,
                             consistent_rms=0.2, muon_weight_dimension_numbers=dims)
    grads_full = random_like(full)
    s, rs = jax.jit(tx.init)(full), jax.jit(ref.init)(params)
    mine_step = compiled(lambda g, s, p: tx.update(g, s, p), grads_full, s, full)
    ref_step = compiled(lambda g, s, p: ref.update(g, s, p), nnx.filter_state(grads_full, nnx.Param), rs, params)
    for _ in range(2):  # the second step exercises momentum and bias correction
        u, s = mine_step(grads_full, s, full)
        r, rs = ref_step(nnx.filter_state(grads_full, nnx.Param), rs, params)
        mine = {dotted_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(u)[0]}
        theirs = {dotted_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(r)[0]}
        biases = [n for n in mine if "e_score_correction_bias" in n]
        assert len(biases) == 1 and all(not mine[n].any() for n in biases)
        assert set(theirs) == set(mine) - set(biases)
        worst = max(rel_err(mine[n], theirs[n]) for n in theirs)
        print(f"split off vs optax.contrib.muon, max relative error: {worst:.1e}")
        assert worst < 1e-5, worst  # measured 2.9e-6: float32 rounding through 5 Newton-Schulz steps
        grads_full = jax.tree.map(lambda g: 0.5 * g + 0.1, grads_full)


# ----- sharding -----

LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "expert_mlp": "tensor", "vocab": "tensor",
                   "experts": "expert"}


def test_sharded_step_equals_single_device(tiny_moe):
    cfg, model = tiny_moe
    assert len(jax.devices()) == 8
    params = nnx.state(model, nnx.Param)
    opt = OptimizerConfig(schedule="constant", learning_rate=1e-2)
    tx = make_optimizer(opt, cfg, params)
    routes = param_routes(params, cfg, opt)
    grads = random_like(params)

    def step(params, state, grads):
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    grads2 = random_like(params, seed=2)

    def two_steps(run, params, state, grads, grads2):
        params, state = run(params, state, grads)
        return run(params, state, grads2)

    state = jax.jit(tx.init)(params)
    want = two_steps(compiled(step, params, state, grads), params, state, grads, grads2)

    mesh = jax.make_mesh((2, 2, 2), ("fsdp", "tensor", "expert"), axis_types=(jax.sharding.AxisType.Auto,) * 3)

    def sharding(path, _):
        spec = [LOGICAL_TO_MESH.get(a) for a in lookup(routes, path).axes]
        return NamedSharding(mesh, PartitionSpec(*spec))

    p_sh = jax.tree_util.tree_map_with_path(sharding, params)
    with jax.sharding.set_mesh(mesh):
        s_sh = state_shardings(jax.eval_shape(tx.init, params), p_sh, NamedSharding(mesh, PartitionSpec()))
        state = jax.jit(tx.init, out_shardings=s_sh)(jax.device_put(params, p_sh))
        assert jax.tree.map(lambda x: x.sharding, state) == s_sh  # state born with the params' shardings
        sharded = compiled(step, params, state, params, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
        put = lambda tree: jax.device_put(tree, p_sh)
        got = two_steps(sharded, put(params), state, put(grads), put(grads2))
    kv = got[0]["layers"][0]["self_attn"]["kv_b_proj"]
    assert kv[...].sharding.spec == PartitionSpec(None, None, "tensor", None)
    mu = got[1].inner_states["muon"].inner_state[0].mu["layers"][0]["mlp"]["experts_gate"]
    assert mu[...].sharding.spec == PartitionSpec(None, "expert", "fsdp", "tensor")  # state follows the param
    worst = max(jax.tree.leaves(jax.tree.map(rel_err, got, want)))
    print(f"sharded vs single device, max relative error: {worst:.1e}")
    assert worst < 1e-5, worst


# ----- schedules -----

def test_schedules_match_formulas():
    lr, end, warm, total, decay = 2e-4, 4e-5, 10, 110, 20
    steps = np.arange(0, 130)
    ramp = lr * np.minimum(steps / warm, 1)
    frac = np.clip((steps - warm) / (total - warm), 0, 1)
    want = {
        "cosine": end + (lr - end) * 0.5 * (1 + np.cos(np.pi * frac)),
        "linear": lr + (end - lr) * frac,
        "constant": np.full(steps.shape, lr),
    }
    d = np.clip((steps - (total - decay)) / decay, 0, 1)
    want_wsd = {"linear": lr + (end - lr) * d, "cosine": end + (lr - end) * 0.5 * (1 + np.cos(np.pi * d))}
    for name, values in list(want.items()) + [("wsd-" + k, v) for k, v in want_wsd.items()]:
        schedule, _, shape = name.partition("-")
        c = OptimizerConfig(schedule=schedule, learning_rate=lr, end_learning_rate=end, warmup_steps=warm,
                            total_steps=total, decay_steps=decay, wsd_decay=shape or "linear")
        got = np.asarray(jax.vmap(learning_rate_schedule(c))(steps))
        expected = np.where(steps < warm, ramp, values)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-12, err_msg=name)
    no_warmup = learning_rate_schedule(OptimizerConfig(schedule="constant", learning_rate=lr))
    assert float(no_warmup(0)) == pytest.approx(lr)
