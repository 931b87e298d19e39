"""GLM-5 losses (glm5_jax/train/losses.py): DSA warm-up and sparse adaptation gradients, MTP, balance and
z-loss against direct formulas, the router bias update, the default path, and one parallel layout.

Tiny preset, L = 40 > index_topk = 16 (sparse path, 3 query blocks of 16 with padding), two documents per
row and a padded tail. Jitted programs compile with LLVM optimisation off (small, fast compiles).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from glm5_jax import config
from glm5_jax.checkpoint import naming
from glm5_jax.errors import ConfigError
from glm5_jax.model import GLM5
from glm5_jax.model.mla import MLA
from glm5_jax.model.moe import MoE, route
from glm5_jax.model.rope import apply_rope, inverse_frequencies, rope_angles
from glm5_jax.sharding.context import Parallelism
from glm5_jax.sharding.layout import ParallelConfig
from glm5_jax.train import losses as LS
from glm5_jax.train import step as S
from tests.step_util import loss_and_grads

B, L = 4, 40
ALL_ON = LS.LossConfig(z_loss=1e-3, mtp_weight=0.3, balance_weight=1e-2, dsa="sparse_adapt", indexer_loss_weight=0.5)


def compile0(fn, *args):
    return jax.jit(fn).lower(*args).compile()


def is_indexer(path) -> bool:
    return LS.is_indexer_path(path)


def flat(tree):
    return [(path, np.asarray(v)) for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]]


@pytest.fixture(scope="module")
def setup():
    cfg = config.load("tiny", ["expert_matmul=tiled"])
    state = S.split(GLM5(cfg, rngs=nnx.Rngs(0)))
    # Sharper index scores than at init (weights_proj x 30): the indexer KL is O(1), not ~1e-4, so its
    # gradients are well above float32 rounding in every comparison.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v.replace(30 * v[...]) if "weights_proj" in jax.tree_util.keystr(p) else v, state.params,
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    state = state._replace(params=params)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vocab_size, (B, L + 1)).astype(np.int32)
    segments = np.ones((B, L), np.int32)
    segments[:, 25:] = 2
    segments[1, 36:] = 0  # padding
    segments[2, 10:] = 2  # a row of a 10-token and a 30-token document
    positions = np.where(segments == 1, np.arange(L), np.arange(L) - np.argmax(segments == 2, axis=1)[:, None])
    positions = np.where(segments == 0, 0, positions).astype(np.int32)
    targets = ids[:, 1:].copy()
    targets[segments != np.pad(segments[:, 1:], ((0, 0), (0, 1)))] = -1  # last token of a piece: no target
    targets[segments == 0] = -1
    batch = {"input_ids": ids[:, :-1], "targets": targets, "positions": positions, "segment_ids": segments}
    return cfg, state, jax.tree.map(jnp.asarray, batch)


@pytest.fixture(scope="module")
def sparse_adapt(setup):
    """All loss terms on, DSA sparse adaptation: loss and gradients, the LM and indexer-KL terms' gradients
    taken on their own, and the model's outputs."""
    _, state, batch = setup
    leaves, treedef = jax.tree.flatten(state.params)
    chosen = [is_indexer(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]

    def fn(params, buffers, batch, w):
        def objective(params):
            return LS.total_loss(params, buffers, state.graphdef, batch, ALL_ON, w)

        def term(name):  # the metric `name` as a function of (indexer leaves, other leaves)
            def f(indexer, other):
                it, io = iter(indexer), iter(other)
                params = jax.tree.unflatten(treedef, [next(it) if c else next(io) for c in chosen])
                return objective(params)[1]["metrics"][name]
            return f

        (loss, aux), grads = jax.value_and_grad(objective, has_aux=True)(params)
        leaves = jax.tree.leaves(params)
        indexer = [v for v, c in zip(leaves, chosen, strict=True) if c]
        other = [v for v, c in zip(leaves, chosen, strict=True) if not c]
        lm_to_indexer = jax.grad(term("lm"))(indexer, other)
        kl_grads = jax.grad(term("indexer_kl"), argnums=(0, 1))(indexer, other)
        out = nnx.merge(state.graphdef, params, buffers)(batch["input_ids"], batch["positions"], batch["segment_ids"],
                                                      dsa_mode="sparse_adapt")
        return grads, dict(aux, loss=loss), out, lm_to_indexer, kl_grads

    w = jnp.float32(0.3)  # traced: a schedule changes it without recompiling
    grads, aux, out, lm_to_indexer, kl_grads = compile0(fn, state.params, state.buffers, batch, w)(
        state.params, state.buffers, batch, w)
    assert len(leaves) == len(chosen)
    return {"loss": grads, "lm_to_indexer": lm_to_indexer, "kl": kl_grads}, aux, out


def test_loss_config_validation():
    assert LS.loss_config_from_dict({}) == LS.LossConfig()
    assert LS.loss_config_from_dict({"dsa": "warmup", "z_loss": 1}).z_loss == 1.0
    assert LS.loss_config_from_dict({"dsa": "dense"}).dsa == "dense"
    with pytest.raises(ConfigError, match=r"^loss.dsa: must be one of sparse, dense, warmup, sparse_adapt; got 'full'"):
        LS.loss_config_from_dict({"dsa": "full"}, prefix="loss.")
    with pytest.raises(ConfigError, match=r"^mtp_weight: must be a finite number >= 0; got -0.1"):
        LS.loss_config_from_dict({"mtp_weight": -0.1})
    with pytest.raises(ConfigError, match=r"^z_los: unknown loss config key \(did you mean 'z_loss'\?\)"):
        LS.loss_config_from_dict({"z_los": 0.1})
    with pytest.raises(ValueError, match=r"^trainable: must be one of all, indexer, no_indexer"):
        LS.trainable_mask({}, "mlp")


def test_no_indexer_mask_is_the_indexer_masks_complement(setup):
    params = setup[1].params
    only, but = (jax.tree.leaves(LS.trainable_mask(params, w)) for w in ("indexer", "no_indexer"))
    assert len(only) == len(but) and sum(only) == 15 and all(a != b for a, b in zip(only, but))


def test_sparse_adapt_gradients_are_separated(setup, sparse_adapt):
    grads, aux, _ = sparse_adapt
    assert len(grads["lm_to_indexer"]) == 15  # 2 stacked layer groups + MTP, 5 tensors each
    for g in grads["lm_to_indexer"]:
        assert not np.asarray(g).any(), "the LM-loss gradient reached the indexer"
    kl_indexer, kl_other = grads["kl"]
    for g in kl_other:
        assert not np.asarray(g).any(), "the indexer-KL gradient reached a non-indexer parameter"
    assert all(np.linalg.norm(g) > 0 for g in kl_indexer)
    assert float(aux["metrics"]["indexer_kl"]) > 0


def test_total_is_weighted_sum_and_terms_match_direct_formulas(setup, sparse_adapt):
    cfg, _, batch = setup
    _, aux, out = sparse_adapt
    m = {k: float(v) for k, v in aux["metrics"].items()}
    targets, segments = np.asarray(batch["targets"]), np.asarray(batch["segment_ids"])

    def ce(logits, t):  # float64 reference: mean CE and mean logsumexp^2 over t >= 0
        logits = np.asarray(logits, np.float64)
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        ok = t >= 0
        picked = np.take_along_axis(logits, np.maximum(t, 0)[..., None], -1)[..., 0]
        return (logz - picked)[ok].mean(), (logz ** 2)[ok].mean()

    lm, z = ce(out.logits, targets)
    assert abs(m["lm"] - lm) < 1e-5 * lm and abs(m["z"] - z) < 1e-5 * z
    # MTP: depth k at t predicts token t + k + 1 = targets[t + k], only inside the document and the row.
    depths = cfg.mtp_depths
    per_depth = []
    for k in range(1, depths + 1):
        t = np.full_like(targets, -1)
        same = segments[:, k:] == segments[:, :-k]
        t[:, :-k] = np.where(same, targets[:, k:], -1)
        per_depth.append(ce(out.mtp_logits[k - 1], t)[0])
    assert abs(m["mtp"] - np.mean(per_depth)) < 1e-5 * m["mtp"]
    # Balance and indexer KL: means of the per-layer sums over rows / real queries, MTP depths included.
    moe_layers, indexer_layers = out.stats.balance.shape[0], out.stats.indexer_kl.shape[0]
    assert (moe_layers, indexer_layers) == (2, 4)  # layers 2-3 are MoE; every layer has an indexer
    balance = (np.sum(out.stats.balance) + np.sum(out.mtp_stats.balance)) / (B * (moe_layers + depths))
    assert abs(m["balance"] - balance) < 1e-6
    kl = (np.sum(out.stats.indexer_kl) + np.sum(out.mtp_stats.indexer_kl)) / (
        (segments > 0).sum() * (indexer_layers + depths))
    assert abs(m["indexer_kl"] - kl) < 1e-5 * kl
    c = ALL_ON
    total = lm + 0.3 * m["mtp"] + c.balance_weight * m["balance"] + c.z_loss * z + c.indexer_loss_weight * kl
    assert abs(float(aux["loss"]) - total) < 1e-5 * total
    # expert_load: main MoE layers, then MTP's summed over depths; every token sends k copies.
    load = np.asarray(aux["expert_load"])
    assert load.shape == (3, cfg.n_routed_experts) and load.dtype == np.int32
    np.testing.assert_array_equal(load[:2], out.expert_load)
    assert (load[:2].sum(1) == B * L * cfg.num_experts_per_tok).all()
    assert load[2].sum() == depths * B * L * cfg.num_experts_per_tok



def test_default_path_equals_lm_loss(setup):
    _, state, batch = setup
    plain = LS.LossConfig(z_loss=0, mtp_weight=0, balance_weight=0, dsa="sparse")

    def fn(params, buffers, batch):
        loss, aux = LS.total_loss(params, buffers, state.graphdef, batch, plain)
        out = nnx.merge(state.graphdef, params, buffers)(batch["input_ids"], batch["positions"], batch["segment_ids"],
                                                      mtp_depths=0)
        return loss, aux, out.logits, out.expert_load

    loss, aux, logits, load = compile0(fn, state.params, state.buffers, batch)(state.params, state.buffers, batch)
    # The reference: mean next-token cross-entropy over the scored targets, written out directly.
    targets = np.asarray(batch["targets"])
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, np.maximum(targets, 0)[..., None], -1)[..., 0]
    ref = ((logz - picked) * (targets >= 0)).sum() / (targets >= 0).sum()
    assert abs(float(loss) - ref) <= 1e-6 * abs(ref)
    assert float(aux["metrics"]["mtp"]) == 0 and float(aux["metrics"]["indexer_kl"]) == 0
    np.testing.assert_array_equal(aux["expert_load"], load)  # no MTP row: MTP did not run
    assert int(aux["tokens"]) == int((targets >= 0).sum())


def test_dsa_warmup_trains_only_the_indexer(setup):
    _, state, batch = setup
    warmup = LS.LossConfig(dsa="warmup")
    mask = LS.trainable_mask(state.params, "indexer")
    tx = optax.sgd(0.5)

    def train_step(params, buffers, batch):
        (loss, aux), grads = jax.value_and_grad(LS.total_loss, has_aux=True)(params, buffers, state.graphdef, batch,
                                                                             warmup)
        updates, _ = tx.update(grads, tx.init(params), params)
        updates = jax.tree.map(lambda u, m: u * m, updates, mask)  # frozen parameters: no update
        return optax.apply_updates(params, updates), grads, loss, aux

    new, grads, loss, aux = compile0(train_step, state.params, state.buffers, batch)(state.params, state.buffers, batch)
    assert float(loss) == pytest.approx(float(aux["metrics"]["indexer_kl"])) and float(loss) > 0
    n_indexer = 0
    for (path, before), (_, after), (_, g) in zip(flat(state.params), flat(new), flat(grads), strict=True):
        name = jax.tree_util.keystr(path)
        if is_indexer(path):
            n_indexer += 1
            assert np.linalg.norm(g) > 0, f"no indexer-KL gradient for {name}"
            assert not np.array_equal(before, after), f"indexer parameter {name} did not move"
        else:
            np.testing.assert_array_equal(before, after, err_msg=name)
            assert not g.any(), f"the KL reached {name}: indexer inputs must be detached"
    assert n_indexer == 15


def test_warmup_kl_matches_full_attention_reference(setup):
    """One layer, dense warm-up at L > index_topk (blocked): KL and output against explicit [L, L] attention."""
    cfg, _, batch = setup
    mla = MLA(cfg, has_indexer=True, stack=None, rngs=nnx.Rngs(3))
    # Sharper index scores than at init, so the KL is O(1) and float32 rounding stays far below the bound.
    mla.indexer.weights_proj.value = 30 * mla.indexer.weights_proj[...]
    graphdef, mla_state = nnx.split(mla)
    x = jax.random.normal(jax.random.key(1), (B, L, cfg.hidden_size))
    segments, positions = batch["segment_ids"], batch["positions"]

    def run(mla_state, x):
        m = nnx.merge(graphdef, mla_state)
        cos, sin = rope_angles(positions, inverse_frequencies(cfg.qk_rope_head_dim, cfg.rope_parameters), x.dtype)
        out, topk, kl = m(x, cos, sin, segments, None, "warmup")
        assert topk is None
        # Reference: explicit attention probabilities [B, H, L, L] (expanded, non-absorbed form).
        nope = cfg.qk_nope_head_dim
        c_q = m.q_a_layernorm(x @ m.q_a_proj[...])
        q = jnp.einsum("blr,rhd->blhd", c_q, m.q_b_proj[...])
        q_nope, q_rope = q[..., :nope], apply_rope(q[..., nope:], cos, sin)
        kv_a = x @ m.kv_a_proj_with_mqa[...]
        c_kv = m.kv_a_layernorm(kv_a[..., :cfg.kv_lora_rank])
        k_rope = apply_rope(kv_a[..., cfg.kv_lora_rank:], cos, sin)
        kv = jnp.einsum("blc,chd->blhd", c_kv, m.kv_b_proj[...])
        s = (jnp.einsum("bqhd,bkhd->bhqk", q_nope, kv[..., :nope]) +
             jnp.einsum("bqhd,bkd->bhqk", q_rope, k_rope)) * cfg.qk_head_dim ** -0.5
        qi, ki, wi = m.indexer.project(x, c_q, cos, sin)
        return out, kl, s, kv[..., nope:], m.indexer.scores(qi, ki, wi)  # index scores [B, L, L]

    out, kl, s, v, index = compile0(run, mla_state, x)(mla_state, x)
    s, v, index = (np.asarray(a, np.float64) for a in (s, v, index))
    seg = np.asarray(segments)
    pos = np.arange(L)
    ok = (pos[None, :, None] >= pos[None, None, :]) & (seg[:, :, None] == seg[:, None, :])  # [B, Q, K]
    s = np.where(ok[:, None], s, -np.inf)
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)  # [B, H, Q, K]
    want_attn = np.einsum("bhqk,bkhd->bqhd", probs, v)
    want_out = np.einsum("bqhd,hde->bqe", want_attn, np.asarray(mla.o_proj[...], np.float64))
    assert np.abs(np.asarray(out) - want_out).max() < 1e-5 * np.abs(want_out).max()
    p = probs.sum(1)
    p /= p.sum(-1, keepdims=True)
    i = np.where(ok, index, -np.inf)
    log_q = i - i.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    terms = np.where(ok & (p > 0), p * (np.log(np.where(p > 0, p, 1)) - np.where(ok, log_q, 0)), 0)
    want_kl = terms.sum(-1)[seg > 0].sum()  # summed over real queries
    print(f"warm-up KL {float(kl):.6e} vs reference {want_kl:.6e}")
    assert abs(float(kl) - want_kl) < 1e-5 * want_kl


def test_balance_loss_matches_direct_formula(setup):
    cfg, _, _ = setup
    moe = MoE(cfg, stack=None, rngs=nnx.Rngs(4))
    moe.e_score_correction_bias.value = 0.1 * jax.random.normal(jax.random.key(5), (cfg.n_routed_experts,))
    x = jax.random.normal(jax.random.key(6), (2, 6, cfg.hidden_size))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 0, 0]], jnp.int32)
    graphdef, moe_state = nnx.split(moe)

    def run(moe_state, x):
        m = nnx.merge(graphdef, moe_state)
        _, load, balance = m(x, seg, with_balance=True)
        logits = x.reshape(-1, x.shape[-1]) @ m.gate[...]
        idx, _ = route(cfg, logits, m.e_score_correction_bias[...])
        return balance, load, logits, idx

    balance, load, logits, idx = compile0(run, moe_state, x)(moe_state, x)
    scores = 1 / (1 + np.exp(-np.asarray(logits, np.float64).reshape(2, 6, -1)))
    idx = np.asarray(idx).reshape(2, 6, -1)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    want = 0.0
    for b in range(2):
        real = np.asarray(seg[b]) > 0
        T = real.sum()
        f = np.array([E / (k * T) * sum(i in idx[b, t] for t in range(6) if real[t]) for i in range(E)])
        P = (scores[b][real] / scores[b][real].sum(-1, keepdims=True)).mean(0)
        want += (f * P).sum()
    assert abs(float(balance) - want) < 1e-5 * want
    assert int(np.asarray(load).sum()) == 12 * k  # the load counts every token (padding included)


def test_router_bias_update_moves_toward_balance(setup, sparse_adapt):
    cfg, state, _ = setup
    _, aux, _ = sparse_adapt
    load = np.asarray(aux["expert_load"])  # [2 main MoE layers + MTP, E]
    rate = 0.01
    update = jax.jit(LS.update_router_bias)
    new = update(state.buffers, aux["expert_load"], jnp.float32(rate))
    old_b = {jax.tree_util.keystr(p): v for p, v in flat(state.buffers)}
    new_b = {jax.tree_util.keystr(p): v for p, v in flat(new)}
    main = np.concatenate([new_b[k] - old_b[k] for k in sorted(old_b) if k.startswith("['layers']")])
    mtp = next(new_b[k] - old_b[k] for k in old_b if k.startswith("['mtp']"))
    delta = np.concatenate([main, mtp[None]])
    np.testing.assert_allclose(delta, rate * np.sign(load.mean(1, keepdims=True) - load), atol=1e-7)
    assert (delta[load > load.mean(1, keepdims=True)] < 0).all() and (delta[load < load.mean(1, keepdims=True)] > 0).all()
    # Without the MTP row (MTP did not run) the MTP bias stays; the parameters are not an input at all.
    kept = update(state.buffers, aux["expert_load"][:2], jnp.float32(rate))
    for (path, a), (_, b) in zip(flat(state.buffers), flat(kept), strict=True):
        if "mtp" in jax.tree_util.keystr(path):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="expert_load has 5 rows"):
        LS.update_router_bias(state.buffers, jnp.zeros((5, cfg.n_routed_experts), jnp.int32), rate)


def test_layout_matches_single_device(setup, sparse_adapt):
    """expert=2 x data=2 x tensor=2, every loss term on: loss and gradients equal one device."""
    _, state, batch = setup
    grads0, aux0, _ = sparse_adapt
    par = Parallelism.create(ParallelConfig(mesh={"expert": 2, "data": 2, "tensor": 2}))
    (loss, aux), grads = loss_and_grads(state, batch, par, ALL_ON)  # the train step's loss, in the layout
    reference = naming.flatten(grads0["loss"])
    errors = []
    for name, g0 in reference.items():
        g, scale = grads[name], np.linalg.norm(g0)
        errors.append((np.linalg.norm(g - g0) / scale if scale else np.linalg.norm(g), name))
    loss_err = abs(float(loss) - float(aux0["loss"])) / abs(float(aux0["loss"]))
    print(f"layout: loss rel err {loss_err:.2e}, max grad rel err {max(errors)[0]:.2e} ({max(errors)[1]})")
    assert loss_err < 1e-5
    assert max(errors)[0] < 1e-5
    for k in aux0["metrics"]:  # the KL (~1e-4 at init) is a small difference of larger terms: atol
        np.testing.assert_allclose(float(aux["metrics"][k]), float(aux0["metrics"][k]), rtol=1e-5, atol=1e-8,
                                   err_msg=k)
    np.testing.assert_array_equal(aux["carry"]["expert_load"], aux0["expert_load"])
