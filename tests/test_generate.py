"""Generation: greedy tokens against transformers' generate, cached decoding against the full forward,
MTP speculative decoding, sharded decoding, the cache's size, and `glm5 generate`."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from glm5_jax.checkpoint.store import load_model
from glm5_jax.generate import cache as cache_lib
from glm5_jax.generate import speculative
from glm5_jax.generate.runner import Generator, prefill_all
from glm5_jax.generate.sampling import Sampling, log_probs
from tests.conftest import TINY, add_mtp_shard, build_hf_model, run_cli

NEW = 12  # generated tokens per row
# Rows of different lengths, the longest past index_topk (16): prefill and decode run the sparse path,
# and the shorter row crosses index_topk while generating.
LENGTHS = (20, 11)


def prompts_for(vocab: int, lengths=LENGTHS, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, vocab, n).astype(np.int32) for n in lengths]  # 0, 1 (EOS) left out


def convert_hf(tmp_path_factory, name, mtp=False, seed=0, **overrides):
    hf = build_hf_model(seed, **overrides)
    path = str(tmp_path_factory.mktemp(name))
    hf.save_pretrained(os.path.join(path, "hf"))
    if mtp:
        add_mtp_shard(os.path.join(path, "hf"), hf)
    ckpt = os.path.join(path, "ckpt")
    assert run_cli("convert", "hf-to-orbax", "--hf-dir", os.path.join(path, "hf"), "--out", ckpt, "-q") == 0
    return hf, ckpt


@pytest.fixture(scope="module")
def sparse_model(tmp_path_factory):
    """(transformers model, our model) of a tiny GLM-5 with an MTP layer."""
    hf, ckpt = convert_hf(tmp_path_factory, "sparse", mtp=True)
    return hf, load_model(ckpt)[0]


@pytest.fixture(scope="module")
def greedy(sparse_model):
    """Plain greedy generation of the batch, with the logits of every generated token."""
    _, model = sparse_model
    prompts = prompts_for(TINY["vocab_size"])
    return prompts, Generator(model).generate(prompts, NEW, return_logits=True)


def hf_greedy(hf, prompt, new=NEW):
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompt[None].astype(np.int64)), do_sample=False, max_new_tokens=new,
                          attention_mask=torch.ones((1, len(prompt)), dtype=torch.long))
    return out[0].numpy()


def assert_matches_transformers(hf, prompts, result):
    for prompt, ours in zip(prompts, result.sequences):
        want = hf_greedy(hf, prompt)
        print(f"prompt {len(prompt)}: ours {ours[len(prompt):].tolist()}\n{'':12}hf   {want[len(prompt):].tolist()}")
        assert ours.tolist() == want.tolist()
        assert len(set(ours[len(prompt):].tolist())) > 2, "a degenerate continuation proves little"


def test_greedy_matches_transformers(sparse_model, greedy):
    hf, _ = sparse_model
    prompts, result = greedy
    assert max(len(s) for s in result.sequences) > TINY["index_topk"] + NEW // 2
    assert_matches_transformers(hf, prompts, result)


def test_greedy_matches_transformers_indexshare(tmp_path_factory):
    types = ["full", "shared", "full", "shared", "shared"]
    hf, ckpt = convert_hf(tmp_path_factory, "share", seed=5, num_hidden_layers=5, indexer_types=types)
    model, _ = load_model(ckpt)
    prompts = prompts_for(TINY["vocab_size"], (19, 9), seed=1)
    result = Generator(model).generate(prompts, NEW)
    assert_matches_transformers(hf, prompts, result)


def test_cached_decoding_matches_full_forward(sparse_model, greedy):
    _, model = sparse_model
    prompts, result = greedy
    worst = 0.0
    for prompt, seq, got in zip(prompts, result.sequences, result.logits):
        full = np.asarray(model(jnp.asarray(seq[None]), mtp_depths=0).logits)[0]
        want = full[len(prompt) - 1:len(seq) - 1]  # the positions each generated token was predicted at
        assert got.shape == want.shape
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    print(f"max |cached - full| / max |logit| = {worst:.2e}")
    assert worst < 1e-5


def test_speculative_greedy_equals_plain(sparse_model, greedy):
    _, model = sparse_model
    prompts, plain = greedy
    spec = Generator(model, speculative_mtp=True).generate(prompts, NEW)
    assert [s.tolist() for s in spec.sequences] == [s.tolist() for s in plain.sequences]
    print(f"mean acceptance length {spec.accepted:.2f} over {spec.steps} steps")
    assert 1.0 <= spec.accepted <= model.cfg.mtp_depths + 1
    assert spec.steps <= plain.steps


def test_verify_accepts_the_agreeing_prefix(sparse_model, greedy):
    """The acceptance rule itself: drafts equal to the main model's greedy continuation are all accepted;
    a wrong draft cuts the step at it and the main model's own token replaces it."""
    _, model = sparse_model
    prompts, plain = greedy
    D = model.cfg.mtp_depths
    graphdef, state = nnx.split(model)
    prompt = jnp.asarray(prompts[0][None])
    length = jnp.asarray([len(prompts[0])], jnp.int32)
    T = len(prompts[0]) + NEW

    @jax.jit
    def run(state, drafts):
        m = nnx.merge(graphdef, state)
        _, cache, hidden = prefill_all(m, prompt, length, T, True)
        ids = jnp.concatenate([jnp.asarray(plain.sequences[0][None, len(prompts[0]):len(prompts[0]) + 1]), drafts],
                              axis=1)
        return speculative.verify(m, cache, hidden, ids, length, None, Sampling(), jax.random.key(0))[:2]

    truth = plain.sequences[0][len(prompts[0]) + 1:len(prompts[0]) + 2 + D]  # tokens n + 1 .. n + D + 1
    tokens, accepted = run(state, jnp.asarray(truth[None, :D]))
    assert int(accepted[0]) == D and np.asarray(tokens)[0].tolist() == truth.tolist()
    wrong = truth[:D].copy()
    wrong[1] = (wrong[1] + 1) % TINY["vocab_size"]
    tokens, accepted = run(state, jnp.asarray(wrong[None]))
    assert int(accepted[0]) == 1 and np.asarray(tokens)[0, :2].tolist() == truth[:2].tolist()


def test_mtp_drafts_match_the_training_forward(sparse_model):
    """Each step's draft logits equal the MTP heads of a full training forward over the committed tokens
    followed by the drafts (depth k at the newest position reads draft k - 1), step after step: the MTP
    depth caches, and their entries rewritten once a drafted token is committed, are exact."""
    _, model = sparse_model
    D = model.cfg.mtp_depths
    graphdef, state = nnx.split(model)
    prompt = prompts_for(TINY["vocab_size"], (18,), seed=4)[0]
    P, T, steps = len(prompt), len(prompt) + 16, 5
    start = jax.jit(lambda st, ids, n: prefill_all(nnx.merge(graphdef, st), ids, n, T, True))
    spec = jax.jit(lambda st, c, h, seq, n: speculative.step(nnx.merge(graphdef, st), c, h, seq, n, Sampling(),
                                                             jax.random.key(0)))
    logits, cache, hidden = start(state, jnp.asarray(prompt[None]), jnp.asarray([P], jnp.int32))
    seq = np.zeros((1, T), np.int32)
    seq[0, :P], seq[0, P] = prompt, int(np.argmax(logits[0]))
    n, worst = P, 0.0
    for _ in range(steps):
        tokens, accepted, cache, hidden, draft_logits = spec(state, cache, hidden, jnp.asarray(seq),
                                                             jnp.asarray([n], jnp.int32))
        drafts = np.argmax(np.asarray(draft_logits)[0], axis=-1)
        x = np.concatenate([seq[0, :n + 1], drafts[:D - 1]])[None]
        want = np.asarray(model(jnp.asarray(x), mtp_depths=D).mtp_logits)[:, 0, n - 1]  # [D, V]
        worst = max(worst, float(np.abs(np.asarray(draft_logits)[0] - want).max() / np.abs(want).max()))
        a = int(accepted[0])
        seq[0, n + 1:n + a + 2] = np.asarray(tokens)[0, :a + 1]
        n += a + 1
    print(f"draft logits vs training-forward MTP logits over {steps} steps: max rel {worst:.2e}")
    assert worst < 1e-5


def test_sharded_decoding_matches_one_device(sparse_model, greedy):
    from glm5_jax.sharding.context import Parallelism
    from glm5_jax.sharding.layout import load_layout

    _, model = sparse_model
    prompts, plain = greedy
    par = Parallelism.create(load_layout(None, ["mesh.data=2", "mesh.tensor=2", "mesh.expert=2"]))
    assert par.mesh.size == 8 and par.axis_size("experts") == 2 and par.axis_size("heads") == 2
    assert par.axis_size("batch") == 4  # data x expert: the two prompts are filled up to four rows
    sharded = Generator(model, par=par).generate(prompts, NEW, return_logits=True)
    assert [s.tolist() for s in sharded.sequences] == [s.tolist() for s in plain.sequences]
    rel = max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(sharded.logits, plain.logits))
    print(f"8 devices vs 1: max rel logits difference {rel:.2e}")
    assert rel < 1e-5


def test_cache_holds_latent_and_indexer_key_only(sparse_model):
    _, model = sparse_model
    cfg = model.cfg
    cache = jax.eval_shape(lambda: cache_lib.empty(cfg, 2, 40, with_mtp=True))
    numbers = cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.index_head_dim
    assert cache_lib.per_token_per_layer(cache) == [numbers * 4] * cfg.num_hidden_layers  # float32
    for g in cache.groups:
        assert g.latent.shape[1:] == (2, 40, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        assert g.index_keys.shape[1:] == (2, 40, cfg.index_head_dim)
    # The released GLM-5 shapes: 512 + 64 latent numbers and a 128-wide key per token and layer, no
    # expanded K/V (64 heads x (192 + 256) numbers); IndexShare layers keep the latent only.
    from glm5_jax.config import ModelConfig

    glm5 = ModelConfig(dtype="bfloat16", indexer_types=["full", "shared"] * 39)
    big = jax.eval_shape(lambda: cache_lib.empty(glm5, 1, 8, with_mtp=True))
    assert cache_lib.per_token_per_layer(big)[:2] == [(576 + 128) * 2, 576 * 2]  # bfloat16
    assert big.mtp.latent.shape == (3, 1, 8, 576) and big.mtp.index_keys.shape == (3, 1, 8, 128)
    assert cache_lib.cache_bytes_per_token(glm5) == (576 + 128) * 2
    assert cache_lib.cache_bytes_per_token(glm5, indexer=False) == 576 * 2


def test_sampling_knobs():
    logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0]])
    p = np.exp(np.asarray(log_probs(logits, Sampling(temperature=1.0, top_k=2))))[0]
    np.testing.assert_allclose(p, [np.e / (np.e + 1), 1 / (np.e + 1), 0, 0], rtol=1e-6)
    soft = np.exp(np.asarray(log_probs(logits, Sampling(temperature=1.0))))[0]
    p = np.exp(np.asarray(log_probs(logits, Sampling(temperature=1.0, top_p=0.8))))[0]
    assert soft[0] < 0.8 <= soft[0] + soft[1]  # the first two tokens reach 0.8
    np.testing.assert_allclose(p, [soft[0] / (soft[0] + soft[1]), soft[1] / (soft[0] + soft[1]), 0, 0], rtol=1e-6)
    hot = np.exp(np.asarray(log_probs(logits, Sampling(temperature=2.0))))[0]
    np.testing.assert_allclose(hot, np.exp(np.asarray(logits[0]) / 2) / np.exp(np.asarray(logits[0]) / 2).sum(),
                               rtol=1e-6)


def test_speculative_sampling_follows_the_target_distribution():
    """accept_sampled's first output token is distributed as the target p whatever the draft q (and the
    acceptance rate is sum min(p, q)); a draft that always agrees with greedy is always accepted."""
    V, n, D = 5, 40000, 2
    p = jnp.asarray([0.5, 0.2, 0.15, 0.1, 0.05])
    q = jnp.asarray([0.1, 0.1, 0.5, 0.2, 0.1])
    key_d, key_a = jax.random.split(jax.random.key(0))
    drafts = jax.random.categorical(key_d, jnp.log(q), shape=(n, D)).astype(jnp.int32)
    p_logp = jnp.broadcast_to(jnp.log(p), (n, D + 1, V))
    q_logp = jnp.broadcast_to(jnp.log(q), (n, D, V))
    accepted, last = speculative.accept_sampled(p_logp, q_logp, drafts, key_a)
    accepted, last = np.asarray(accepted), np.asarray(last)
    first = np.where(accepted > 0, np.asarray(drafts)[:, 0], last)  # the step's first committed token
    np.testing.assert_allclose(np.bincount(first, minlength=V) / n, np.asarray(p), atol=0.01)
    np.testing.assert_allclose((accepted > 0).mean(), float(jnp.minimum(p, q).sum()), atol=0.01)
    second = np.where(accepted > 1, np.asarray(drafts)[:, 1], last)[accepted > 0]
    np.testing.assert_allclose(np.bincount(second, minlength=V) / len(second), np.asarray(p), atol=0.015)
    logits = jnp.asarray([[[0.0, 3, 0, 0, 0], [0, 0, 3, 0, 0], [0, 0, 0, 3, 0]]])
    assert [int(a[0]) for a in speculative.accept_greedy(logits, jnp.asarray([[1, 2]], jnp.int32))] == [2, 3]
    assert [int(a[0]) for a in speculative.accept_greedy(logits, jnp.asarray([[1, 4]], jnp.int32))] == [1, 2]
    assert [int(a[0]) for a in speculative.accept_greedy(logits, jnp.asarray([[0, 2]], jnp.int32))] == [0, 1]


def test_seeded_sampling(sparse_model):
    _, model = sparse_model
    prompts = prompts_for(TINY["vocab_size"])
    top1 = Generator(model, Sampling(temperature=1.0, top_k=1, seed=3)).generate(prompts, 6)
    plain = Generator(model).generate(prompts, 6)
    assert [s.tolist() for s in top1.sequences] == [s.tolist() for s in plain.sequences]
    runs = [Generator(model, Sampling(temperature=1.5, seed=seed), speculative_mtp=True).generate(prompts, 6)
            for seed in (0, 0, 1)]
    assert [s.tolist() for s in runs[0].sequences] == [s.tolist() for s in runs[1].sequences]
    assert [s.tolist() for s in runs[0].sequences] != [s.tolist() for s in runs[2].sequences]


# ----- glm5 generate -----


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("init") / "ckpt")
    assert run_cli("init", "--config", "tiny", "--out", out, "--override", "max_position_embeddings=64") == 0
    return out


def test_generate_cli_writes_sequences(tiny_ckpt, tmp_path, capsys):
    ids = np.full((2, 20), -1, np.int64)
    ids[0, :20] = np.arange(3, 23)
    ids[1, :7] = np.arange(40, 47)
    np.save(tmp_path / "ids.npy", ids)
    capsys.readouterr()
    assert run_cli("generate", "--checkpoint", tiny_ckpt, "--prompt-ids", tmp_path / "ids.npy",
                   "--max-new-tokens", 8, "--speculative", "mtp", "--output", tmp_path / "out.npy") == 0
    out, err = capsys.readouterr()
    assert "tokens/s" in out and "mean acceptance length" in out
    assert "compiling the prefill and decode steps for 2 rows x 28 slots, then generating" in err, err
    seqs = np.load(tmp_path / "out.npy")
    assert seqs.dtype == np.int32 and seqs.shape[0] == 2
    assert seqs[0, :20].tolist() == list(range(3, 23)) and seqs[1, :7].tolist() == list(range(40, 47))
    assert (seqs[:, 7:] >= 0).sum(axis=1)[1] >= 1  # the short row was continued, not padded from its end
    assert run_cli("generate", "--checkpoint", tiny_ckpt, "--prompt", "def f(x):", "--tokenizer", "bytes",
                   "--max-new-tokens", 4) == 0
    assert "[0] def f(x):" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["empty", "too-long", "out-of-vocab", "tokenizer", "no-tokenizer"])
def test_generate_cli_bad_input(case, tiny_ckpt, tmp_path, capsys, monkeypatch):
    from glm5_jax.checkpoint import store

    monkeypatch.setattr(store, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    ids = tmp_path / "ids.npy"
    args = {
        "empty": ["--prompt", "", "--tokenizer", "bytes"],
        "too-long": ["--prompt-ids", ids],
        "out-of-vocab": ["--prompt-ids", ids],
        "tokenizer": ["--prompt", "hi", "--tokenizer", "gpt2"],
        "no-tokenizer": ["--prompt", "hi"],
    }[case]
    if case == "too-long":
        np.save(ids, np.full((1, 64), 5))
    if case == "out-of-vocab":
        np.save(ids, np.array([[3, 4, 512]]))
    capsys.readouterr()
    assert run_cli("generate", "--checkpoint", tiny_ckpt, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    print(err)
    assert len(err) == 1 and err[0].startswith("glm5: error: ")
    expected = {"empty": "is empty", "too-long": "max_position_embeddings 64", "out-of-vocab": "[0, 512)",
                "tokenizer": "unknown tokenizer", "no-tokenizer": "needs --tokenizer"}[case]
    assert expected in err[0]
