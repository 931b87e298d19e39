"""RL rollouts: tokens as generated, recorded log-probs bit-identical to the trainer's scoring on one layout,
|log rho| across layouts and in bfloat16, the decoder's distribution against the scoring pass, DSA top-k of
decoding against training, weights swapped without recompiling, `to_batch`, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from glm5_jax import config
from glm5_jax.checkpoint.naming import flatten
from glm5_jax.errors import ConfigError
from glm5_jax.generate.runner import Generator
from glm5_jax.generate.sampling import Sampling
from glm5_jax.model.state import init_sharded
from glm5_jax.rl.rollout import RolloutEngine, Sample, check_prompts
from glm5_jax.rl.scoring import BASE_FIELDS, Scorer, to_batch
from glm5_jax.sharding.context import Parallelism
from glm5_jax.sharding.layout import ParallelConfig

G, NEW, MAX_LENGTH, SEED = 2, 10, 32, 7
ROWS = 2  # rows of the scoring pass's batches, and of the trainer's microbatches
LENGTHS = (21, 17)  # past index_topk (16): prefill, decode and scoring all run DSA's sparse path


def one_device() -> Parallelism:
    return Parallelism.create(ParallelConfig(mesh={"data": 1}), jax.devices()[:1])


def eight_devices() -> Parallelism:  # parameters split over fsdp x tensor, rows over fsdp
    return Parallelism.create(ParallelConfig(mesh={"fsdp": 4, "tensor": 2}))


def prompts(vocab: int):
    rng = np.random.default_rng(0)
    return [rng.integers(2, vocab, n).astype(np.int32) for n in LENGTHS]


def weights(cfg, seed: int = 0):
    state = init_sharded(cfg, one_device(), seed)
    return state, flatten(state.params), flatten(state.buffers)


def engine(cfg, par, score_rows=ROWS):
    return RolloutEngine(cfg, par, temperature=1.0, max_new_tokens=NEW, max_length=MAX_LENGTH, score_rows=score_rows)


@pytest.fixture(scope="module")
def f32():
    """(model config, model state, params, buffers, prompts, engine on one device, its samples)."""
    cfg = config.load("tiny")
    state, params, buffers = weights(cfg)
    ps = prompts(cfg.vocab_size)
    eng = engine(cfg, one_device())
    samples = eng.generate(params, buffers, ps, G, version=3, seed=SEED, first_sample_id=100,
                           prompt_indices=[40, 41])
    return cfg, state, params, buffers, ps, eng, samples


def score(scorer, params, buffers, samples, seq_len, rows, accumulate):
    """What a trainer computes: the recorded-log-prob layout of `to_batch`, scored microbatch by microbatch."""
    batch = to_batch(samples, seq_len, rows, accumulate)
    logp = np.concatenate([scorer(params, buffers, {k: batch[k][a] for k in BASE_FIELDS}) for a in range(accumulate)])
    return batch["rollout_logp"].reshape(logp.shape), logp, batch["targets"].reshape(logp.shape) >= 0


def abs_log_rho(recorded, logp, trained) -> np.ndarray:
    return np.abs(recorded[trained].astype(np.float64) - logp[trained])


def quantiles(x) -> str:
    q = np.quantile(x, [0.5, 0.9, 0.99, 1.0])
    return " ".join(f"{n} {v:.2e}" for n, v in zip(("p50", "p90", "p99", "max"), q))


def test_samples_are_the_generators_tokens(f32):
    cfg, state, params, buffers, ps, _, samples = f32
    rows = [p for p in ps for _ in range(G)]
    model = nnx.merge(state.graphdef, state.params, state.buffers)
    want = Generator(model, Sampling(temperature=1.0)).generate(rows, NEW, MAX_LENGTH, seed=SEED).sequences
    assert [s.tokens.tolist() for s in samples] == [w.tolist() for w in want]
    assert [s.sample_id for s in samples] == [100, 101, 102, 103]
    assert [(s.group, s.prompt_index) for s in samples] == [(0, 40), (0, 40), (1, 41), (1, 41)]
    assert samples[0].response.tolist() != samples[1].response.tolist()  # each sample draws its own tokens
    for s, p in zip(samples, rows):
        assert s.tokens.dtype == np.int32 and s.tokens[:len(p)].tolist() == p.tolist() and s.prompt_length == len(p)
        assert s.trained.tolist() == [t >= len(p) for t in range(len(s.tokens))]
        assert s.version == 3 and s.finished == (s.tokens[-1] == cfg.eos_token_id) and s.reward is None
        assert np.all(s.logprobs[~s.trained] == 0) and np.all(s.logprobs[s.trained] < 0)
    assert max(len(s.tokens) for s in samples) > cfg.index_topk + NEW // 2


def test_recorded_logprobs_bit_identical_on_one_layout(f32):
    """The trainer's own Scorer on its own microbatches: the scoring pass's shape [ROWS, MAX_LENGTH], other
    samples side by side (the rollout scored 0, 1 | 2, 3; the trainer 2, 0 | 3, 1)."""
    cfg, _, params, buffers, _, _, samples = f32
    order = [2, 0, 3, 1]
    recorded, logp, trained = score(Scorer(cfg, one_device(), 1.0), params, buffers, [samples[i] for i in order],
                                    MAX_LENGTH, ROWS, 2)
    assert trained.sum() == sum(s.trained[1:].sum() for s in samples) > 0
    assert np.array_equal(recorded, logp)
    # Another microbatch shape is another program: it may round differently.
    recorded, logp, trained = score(Scorer(cfg, one_device(), 1.0), params, buffers, samples, MAX_LENGTH, 1, 4)
    print(f"microbatches of 1 row instead of {ROWS}: max |log rho| {abs_log_rho(recorded, logp, trained).max():.2e}")


def test_recorded_logprobs_bit_identical_on_eight_devices(f32):
    cfg, _, params, buffers, ps, _, _ = f32
    par = eight_devices()
    samples = engine(cfg, par).generate(params, buffers, ps, G, version=0, seed=SEED, first_sample_id=0,
                                        prompt_indices=[0, 1])
    recorded, logp, _ = score(Scorer(cfg, par, 1.0), params, buffers, samples[::-1], MAX_LENGTH, ROWS, 2)
    assert np.array_equal(recorded, logp)


def test_log_rho_across_layouts_and_in_bfloat16(f32):
    cfg, _, params, buffers, _, _, samples = f32
    recorded, logp, trained = score(Scorer(cfg, eight_devices(), 1.0), params, buffers, samples, MAX_LENGTH, ROWS, 2)
    layouts = abs_log_rho(recorded, logp, trained)
    bf16_cfg = config.load("tiny", ["dtype=bfloat16"])
    _, bf16, trained = score(Scorer(bf16_cfg, one_device(), 1.0), params, buffers, samples, MAX_LENGTH, ROWS, 2)
    dtype = abs_log_rho(recorded, bf16, trained)
    _, bf16_eight, trained = score(Scorer(bf16_cfg, eight_devices(), 1.0), params, buffers, samples, MAX_LENGTH,
                                   ROWS, 2)
    bf16_layouts = abs_log_rho(bf16, bf16_eight, trained)
    print(f"|log rho| one device vs fsdp4 x tensor2, float32: {quantiles(layouts)}")
    print(f"|log rho| float32 vs bfloat16, one device: {quantiles(dtype)}")
    print(f"|log rho| one device vs fsdp4 x tensor2, bfloat16: {quantiles(bf16_layouts)}")
    assert layouts.max() < 1e-4  # rounding only; a wrong key selection or position shows as > 1e-2
    assert 1e-4 < np.quantile(dtype, 0.99) and dtype.max() < 0.1  # bfloat16 rounding, not another model
    assert bf16_layouts.max() < 0.1


def test_decoder_distribution_matches_scoring_pass(f32):
    *_, samples = f32
    gap = np.concatenate([np.abs(s.sample_logprobs - s.logprobs)[s.trained] for s in samples])
    print(f"|decode log-prob - scoring log-prob| float32 over {gap.size} tokens: {quantiles(gap)}")
    assert gap.max() < 1e-5


def _layer0(model):
    """The model's first layer (an indexer layer) as a module, out of its stacked group."""
    graphdef, state = nnx.split(model.layers[0])
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[0], state))


@pytest.mark.parametrize("ties", [False, True], ids=["scores", "all-tied"])
def test_decode_topk_equals_training_topk(f32, ties):
    """Layer 0 (its input is the embedding in both, so any difference is in the selection): top-k of the
    decode step at each generated position (indexer scores over the cache) against `select_topk` in the
    training forward of the whole sequence. all-tied: the indexer's head weights zeroed, so every score is
    0 and both must pick the lowest positions."""
    cfg, state, *_, samples = f32
    model = nnx.merge(state.graphdef, state.params, state.buffers)
    layer = _layer0(model)
    if ties:
        w = layer.self_attn.indexer.weights_proj
        w.value = jnp.zeros_like(w.value)
    s = max(samples, key=lambda s: len(s.tokens))
    ids = jnp.asarray(s.tokens)[None]
    L, P = ids.shape[1], s.prompt_length
    x = layer.input_layernorm(model.embed(ids))
    cos, sin = model.rope(jnp.arange(L, dtype=jnp.int32)[None])
    _, train_topk, _, _ = layer.self_attn.forward(x, cos, sin, jnp.ones((1, L), jnp.int32), None)
    _, _, _, (latent, keys) = layer.self_attn.forward(x[:, :P], cos[:, :P], sin[:, :P],
                                                      jnp.ones((1, P), jnp.int32), None, with_cache=True)
    pad = ((0, 0), (0, MAX_LENGTH - P), (0, 0))
    latent, keys = jnp.pad(latent, pad), jnp.pad(keys, pad)
    for p in range(P, L):
        pos = jnp.array([[p]], jnp.int32)
        _, topk, latent, keys = layer.self_attn.decode(x[:, p:p + 1], cos[:, p:p + 1], sin[:, p:p + 1], pos,
                                                       latent, keys, None)
        assert np.array_equal(np.asarray(topk)[0, 0], np.asarray(train_topk)[0, p]), p
        if ties:
            assert np.asarray(topk)[0, 0].tolist() == list(range(cfg.index_topk))
    assert L - P >= NEW // 2


def test_new_weights_without_recompiling(f32):
    cfg, _, params, buffers, ps, eng, samples = f32
    compiles = eng.compiles
    assert compiles == 3  # prefill, decode step, scoring pass
    _, params2, buffers2 = weights(cfg, seed=1)
    again = eng.generate(params2, buffers2, ps, G, version=4, seed=SEED, first_sample_id=0, prompt_indices=[0, 1])
    assert eng.compiles == compiles
    fresh = engine(cfg, one_device()).generate(params2, buffers2, ps, G, version=4, seed=SEED, first_sample_id=0,
                                               prompt_indices=[0, 1])
    assert [s.tokens.tolist() for s in again] == [s.tokens.tolist() for s in fresh]
    assert all(np.array_equal(a.logprobs, b.logprobs) for a, b in zip(again, fresh))
    assert [s.tokens.tolist() for s in again] != [s.tokens.tolist() for s in samples]


def _sample(i, tokens, prompt_length, failure=None):
    tokens = np.asarray(tokens, np.int32)
    trained = np.arange(len(tokens)) >= prompt_length
    logprobs = np.where(trained, -0.5 - np.arange(len(tokens)), 0).astype(np.float32)
    return Sample(i, 0, 0, tokens, prompt_length, trained, logprobs, 0, True, failure=failure)


def test_to_batch_alignment_and_padding():
    samples = [_sample(0, [5, 6, 7, 8, 9], 2), _sample(1, [3, 4, 5], 1, failure="reward crashed"),
               _sample(2, [7, 8, 9, 1], 3)]
    b = to_batch(samples, seq_len=6, rows=2, accumulate=2)
    assert all(v.shape == (2, 2, 6) for v in b.values())
    assert b["input_ids"][0, 0].tolist() == [5, 6, 7, 8, 0, 0]
    assert b["targets"][0, 0].tolist() == [-1, 7, 8, 9, -1, -1]  # token t + 1 where it is trained
    assert b["rollout_logp"][0, 0].tolist() == [0, -2.5, -3.5, -4.5, 0, 0]
    assert b["positions"][0, 0].tolist() == [0, 1, 2, 3, 0, 0]
    assert b["segment_ids"][0, 0].tolist() == [1, 1, 1, 1, 0, 0]
    assert b["targets"][0, 1].tolist() == [-1] * 6 and not b["rollout_logp"][0, 1].any()  # failure: nothing
    assert b["targets"][1, 0].tolist() == [-1, -1, 1, -1, -1, -1]
    assert b["segment_ids"][1, 1].tolist() == [0] * 6 and b["targets"][1, 1].tolist() == [-1] * 6  # inert row
    with pytest.raises(ConfigError, match=r"^to_batch: 3 samples do not fit 1 x 2 rows$"):
        to_batch(samples, 6, 2, 1)
    with pytest.raises(ConfigError, match=r"^to_batch: sample 0 has 5 tokens, longer than seq_len 4$"):
        to_batch(samples, 4, 2, 2)


def test_bad_input_one_line_before_compiling():
    cfg = config.load("tiny")
    eng = engine(cfg, one_device())
    with pytest.raises(ConfigError, match=r"^prompt 7: 32 tokens; max_length 32 leaves room for prompts of at most 31$"):
        eng.generate({}, {}, [np.ones(5, np.int32), np.ones(32, np.int32)], G, 0, 0, 0, prompt_indices=[6, 7])
    assert eng.compiles == 0
    with pytest.raises(ConfigError, match=r"^prompt 1: empty$"):
        check_prompts([np.ones(3), np.ones(0)], 8)
    for kw, msg in ((dict(top_k=5), "top_k 5, top_p 1.0: RL samples by temperature only"),
                    (dict(top_p=0.9), "top_k 0, top_p 0.9"), (dict(temperature=0.0), "temperature: RL samples at")):
        with pytest.raises(ConfigError, match="^" + msg):
            RolloutEngine(cfg, one_device(), **{"temperature": 1.0, "max_new_tokens": 4, "max_length": 8, **kw})
