"""The RL objectives (`glm5_jax.rl.objectives`) and group advantages (`glm5_jax.rl.advantages`): each equals a
direct NumPy implementation of its formula, written here token by token (loss, every metric, the gradient),
on random inputs with masked tokens, a failed sample, an all-equal group, ratios outside the clip band and rho
outside the IcePop band on both sides; microbatches with the whole step's normalisers add up to the whole
batch; a GRPO train step on the tiny model trains the model and leaves the DSA indexer bitwise unchanged.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5_jax import config, optim
from glm5_jax.checkpoint.naming import flatten
from glm5_jax.errors import ConfigError
from glm5_jax.model import GLM5
from glm5_jax.rl import objectives as RO
from glm5_jax.rl.advantages import group_advantages, reward_metrics
from glm5_jax.rl.logprobs import state_logprobs
from glm5_jax.train import losses
from glm5_jax.train import objectives as TO
from glm5_jax.train import step as S
from tests.step_util import microbatches, one_device

CFG = losses.LossConfig()
KL_CFG = dataclasses.replace(CFG, kl_weight=0.05)
B, L = 8, 16


def random_fields(seed=0):
    """Rows of 4 samples x 2 groups: prompt tokens and padding unscored, row 3 failed (nothing scored), group 1's
    rewards all equal (advantage 0); log-ratios spread wide enough to leave every band on both sides."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, 100, (B, L)).astype(np.int32)
    targets[:, :3] = -1  # prompt
    for i, end in enumerate([16, 12, 9, 16, 14, 16, 5, 11]):
        targets[i, end:] = -1  # padding
    targets[3] = -1  # a failed sample
    rewards = np.array([1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0])
    groups, valid = np.repeat([0, 1], 4), np.arange(B) != 3
    adv = group_advantages(rewards, groups, valid, normalize_std=True)
    logp = -rng.gamma(2.0, 1.0, (B, L))
    old = logp + rng.normal(0, 0.35, (B, L))
    rollout = old + rng.normal(0, 0.8, (B, L))
    teacher = logp + rng.normal(0, 0.5, (B, L))
    ref = logp + rng.normal(0, 0.3, (B, L))
    scored = targets >= 0
    z = lambda x: np.where(scored, x, 0.0).astype(np.float32)
    return {"targets": targets, "old_logp": z(old), "rollout_logp": z(rollout), "teacher_logp": z(teacher),
            "ref_logp": z(ref), "advantages": np.where(scored, adv[:, None], 0.0).astype(np.float32),
            "entropy": z(rng.uniform(0, 3, (B, L)))}, z(logp)


def reference(kind, logp, f, cfg):
    """(loss, metric numerators, d loss / d logp) of the formulas, one token at a time, in float64."""
    lo, hi, beta = 1 - cfg.clip_low, 1 + cfg.clip_high, cfg.icepop_beta
    m = dict.fromkeys(["policy_loss", "clipped_share", "entropy", "response_tokens", "samples"], 0.0)
    m.update({"grpo": {"icepop_masked_share": 0.0}, "dis": {}, "distill": {"teacher_gap": 0.0}}[kind])
    if cfg.kl_weight > 0:
        m["kl"] = 0.0
    grad = np.zeros(logp.shape)
    for i in range(logp.shape[0]):
        tokens = [t for t in range(logp.shape[1]) if f["targets"][i, t] >= 0]
        m["samples"] += bool(tokens)
        for t in tokens:
            n, lp = len(tokens), float(logp[i, t])
            a = float(f["advantages"][i, t])
            if kind == "grpo":
                r = np.exp(lp - f["old_logp"][i, t])
                rho = np.exp(f["old_logp"][i, t] - f["rollout_logp"][i, t])
                pop = rho if 1 / beta <= rho <= beta else 0.0
                clipped = np.clip(r, lo, hi) * a < r * a
                term, dterm = pop * min(r * a, np.clip(r, lo, hi) * a), 0.0 if clipped else pop * r * a
                m["icepop_masked_share"] += pop == 0
            else:
                if kind == "distill":
                    a = f["teacher_logp"][i, t] - lp
                    m["teacher_gap"] += a
                r = np.exp(lp - f["rollout_logp"][i, t])
                w = r if lo < r < hi else 0.0
                term, dterm, clipped = w * a * lp, w * a, w == 0
            m["policy_loss"] -= term / n
            grad[i, t] -= dterm / n
            if cfg.kl_weight > 0:
                d = f["ref_logp"][i, t] - lp
                m["kl"] += (np.exp(d) - d - 1) / n
                grad[i, t] += cfg.kl_weight * (1 - np.exp(d)) / n
            m["clipped_share"] += clipped
            m["entropy"] += f["entropy"][i, t]
            m["response_tokens"] += 1
    return m["policy_loss"] + cfg.kl_weight * m.get("kl", 0.0), m, grad


def test_the_inputs_leave_every_band_on_both_sides():
    f, logp = random_fields()
    s, a = f["targets"] >= 0, f["advantages"]
    r = np.exp(logp - f["old_logp"])[s]
    rho = np.exp(f["old_logp"] - f["rollout_logp"])[s]
    dis_r = np.exp(logp - f["rollout_logp"])[s]
    assert ((r > 1.28) & (a[s] > 0)).any() and ((r < 0.8) & (a[s] < 0)).any()
    assert ((r > 1.28) & (a[s] < 0)).any() and ((r < 0.8) & (a[s] > 0)).any()  # (the clip is not active there)
    assert (rho < 0.5).any() and (rho > 2).any() and (dis_r < 0.8).any() and (dis_r > 1.28).any()
    assert (a[s] == 0).any() and (a[s] > 0).any() and (a[s] < 0).any()


@pytest.mark.parametrize("kind", RO.KINDS)
@pytest.mark.parametrize("cfg", [CFG, KL_CFG], ids=["no_kl", "kl"])
def test_policy_terms_equal_the_formulas(kind, cfg):
    f, logp = random_fields()
    jf = {k: jnp.asarray(v) for k, v in f.items()}
    (loss, sums), grad = jax.value_and_grad(lambda x: RO.policy_terms(kind, x, jf, cfg), has_aux=True)(
        jnp.asarray(logp))
    want, want_sums, want_grad = reference(kind, logp, f, cfg)
    assert np.isfinite(float(loss)) and float(loss) == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert set(sums) == set(want_sums)
    for k, v in want_sums.items():
        assert float(sums[k]) == pytest.approx(v, rel=1e-5, abs=1e-6), k
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)
    assert want_sums["clipped_share"] > 0 and want_sums.get("icepop_masked_share", 1) > 0
    obj = TO.make(kind, config.load("tiny"), cfg)
    assert set(obj.metric_names) == set(want_sums) and set(RO.KIND_FIELDS[kind]) <= set(obj.fields)
    assert ("ref_logp" in obj.fields) == (cfg.kl_weight > 0)


@pytest.mark.parametrize("kind", RO.KINDS)
def test_an_extreme_ratio_gives_a_finite_loss_and_gradient(kind):
    f, logp = random_fields()
    for k in ("old_logp", "rollout_logp"):
        f[k][0, 5], f[k][1, 4] = -150.0, 0.0  # pi_theta / pi_old: e^150 and e^-(large)
    logp[1, 4] = -150.0
    jf = {k: jnp.asarray(v) for k, v in f.items()}
    (loss, _), grad = jax.value_and_grad(lambda x: RO.policy_terms(kind, x, jf, KL_CFG), has_aux=True)(
        jnp.asarray(logp))
    assert np.isfinite(float(loss)) and np.isfinite(np.asarray(grad)).all()


@pytest.mark.parametrize("kind", RO.KINDS)
def test_microbatches_with_the_steps_normalisers_add_up_to_the_whole_batch(kind):
    f, logp = random_fields(1)
    norms = RO.normalizers(jnp.asarray(f["targets"]))
    assert int(norms["samples"]) == 7 and int(norms["tokens"]) == int(np.sum(f["targets"] >= 0))

    def terms(rows):
        loss, sums = RO.policy_terms(kind, jnp.asarray(logp[rows]), {k: jnp.asarray(v[rows]) for k, v in f.items()},
                                     KL_CFG)
        return loss / norms["samples"], sums

    whole, parts = terms(slice(None)), [terms(slice(0, 3)), terms(slice(3, None))]
    assert float(whole[0]) == pytest.approx(sum(float(p[0]) for p in parts), rel=1e-6)
    for k in whole[1]:
        assert float(whole[1][k]) == pytest.approx(sum(float(p[1][k]) for p in parts), rel=1e-6, abs=1e-7), k


def test_group_advantages_equal_numpy():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.3, 0.3, 0.3, 5.0, 2.0, 7.0, 4.0])
    groups = np.array([7, 7, 7, 7, 2, 2, 2, 2, 9, 9, 4])
    valid = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 0], bool)  # group 2: equal once 5.0 fails; 9: one valid
    for std in (False, True):
        got = group_advantages(rewards, groups, valid, std)
        r = rewards[:4]
        want = np.zeros(11)
        want[:4] = (r - r.mean()) / ((r.std() + 1e-6) if std else 1.0)
        assert got.dtype == np.float32 and np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert not group_advantages([0.1] * 3, [0, 0, 0], [True] * 3, True).any()  # mean 0.1 + 1e-17, still 0
    m = reward_metrics(rewards, groups, valid)
    assert m["reward_mean"] == pytest.approx(np.mean(rewards[valid]))
    assert m["reward_group_std"] == pytest.approx(np.mean([r.std(), 0.0, 0.0]))
    assert m["uniform_group_share"] == pytest.approx(2 / 3) and m["failed_share"] == pytest.approx(3 / 11)


def test_rho_quantiles_over_scored_tokens():
    f, _ = random_fields()
    s = f["targets"] >= 0
    rho = np.exp(f["old_logp"][s].astype(np.float64) - f["rollout_logp"][s])
    got = RO.rho_quantiles(f["old_logp"], f["rollout_logp"], f["targets"])
    assert got == pytest.approx({"rho_q01": np.quantile(rho, 0.01), "rho_q50": np.median(rho),
                                 "rho_q99": np.quantile(rho, 0.99)})


@pytest.mark.parametrize("call, message", [
    (lambda: RO.check_group_size("grpo", 1, "stages.0.rollout.group_size"),
     "stages.0.rollout.group_size: objective grpo compares the samples of a prompt's group"),
    (lambda: RO.check_group_size("dis", 1), "group_size: objective dis compares"),
    (lambda: RO.check_group_size("distill", 0), "group_size: must be a positive integer; got 0"),
    (lambda: TO.make("grpo", config.load("tiny"), losses.LossConfig(dsa="sparse_adapt"), "stages.0.objective"),
     "stages.0.objective: grpo: losses.dsa: RL trains with the indexer frozen"),
    (lambda: losses.loss_config_from_dict({"icepop_beta": 1}, "losses."),
     "losses.icepop_beta: must be a finite number > 1"),
    (lambda: losses.loss_config_from_dict({"temperature": 0}), "temperature: must be a finite number > 0; got 0.0"),
    (lambda: losses.loss_config_from_dict({"clip_low": 1.5}), "clip_low: must be a finite number <= 1; got 1.5"),
])
def test_bad_settings_are_one_line(call, message):
    with pytest.raises(ConfigError) as e:
        call()
    assert str(e.value).startswith(message) and "\n" not in str(e.value) and e.value.exit_status == 2
    RO.check_group_size("distill", 1)
    RO.check_group_size("grpo", 2)


def test_a_grpo_step_trains_the_model_and_leaves_the_indexer_bitwise_unchanged():
    """Two GRPO steps on a rollout-shaped batch; the first step's loss and metrics (gradient norm included)
    equal those of the same rows in 2 microbatches (accumulation equals one big batch through the seam)."""
    cfg = config.load("tiny", ["expert_matmul=tiled"])
    rows, length = 4, 24  # > index_topk: sparse attention selects keys with the indexer
    state = S.split(GLM5(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    ids = rng.integers(2, cfg.vocab_size, (rows, length + 1)).astype(np.int32)
    targets = ids[:, 1:].copy()
    targets[:, :6] = -1  # prompt
    targets[1, 18:] = -1  # a shorter response (padding)
    targets[3] = -1  # a failed sample
    batch = {"input_ids": ids[:, :-1], "targets": targets, "segment_ids": np.ones((rows, length), np.int32),
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy()}
    batch["segment_ids"][1, 20:] = 0
    old, _ = jax.jit(lambda p, b, x: state_logprobs(p, b, state.graphdef, x))(state.params, state.buffers, batch)
    old = np.asarray(old)
    adv = group_advantages([1.0, 0.0, 1.0, 0.0], [0] * 4, [True, True, True, False], True)
    batch.update(old_logp=old, rollout_logp=np.where(targets >= 0, old + rng.normal(0, 0.3, old.shape), 0),
                 advantages=np.where(targets >= 0, adv[:, None], 0))
    batch = {k: np.asarray(v, S.StepConfig(cfg, CFG, rows, length, objective="grpo").fields[k])
             for k, v in batch.items()}

    def make(accumulate):
        spec = S.StepConfig(cfg, CFG, rows // accumulate, length, accumulate, "no_indexer", "grpo")
        step = S.make_step(spec, one_device(), optim.from_dict({"matrix_optimizer": "adamw"}), S.abstract_state(cfg))
        params, buffers = (jax.tree.map(jnp.array, flatten(t)) for t in (state.params, state.buffers))
        return step, params, buffers, step.init_optimizer(params)

    step, *args = make(2)
    split_metrics = jax.device_get(step(*args, microbatches(batch, 2), 2, 1e-3, 0.001)[3])
    step, params, buffers, opt_state = make(1)
    before = jax.device_get((params, buffers))
    for i in range(2):
        params, buffers, opt_state, m = step(params, buffers, opt_state, microbatches(batch, 1), 1, 1e-3, 0.001)
        assert np.isfinite(float(m["loss"])) and bool(m["finite"]) and int(m["samples"]) == 3
        if i == 0:
            assert set(m) == set(split_metrics)
            for k, v in jax.device_get(m).items():
                assert float(v) == pytest.approx(float(split_metrics[k]), rel=1e-5, abs=1e-7), k
    after = jax.device_get((params, buffers))
    indexer = [k for k in before[0] if ".self_attn.indexer." in k]
    assert indexer and all(np.array_equal(before[0][k], after[0][k]) for k in indexer)
    trained = [k for k in before[0] if k not in indexer and not k.startswith("mtp.")]  # (no MTP loss in RL)
    assert all(not np.array_equal(before[0][k], after[0][k]) for k in trained)
    assert all(np.array_equal(before[1][k], after[1][k]) for k in before[1])  # no router bias update
