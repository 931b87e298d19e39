"""INT4 QAT of the routed experts: the quantizer, its straight-through gradient, and the compressed-tensors
export, whose decompressed weights are the QAT forward's weights bit for bit."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from glm5_jax import config as config_lib
from glm5_jax.convert.int4 import pack_int4
from glm5_jax.errors import ConfigError
from glm5_jax.model.quant import fake_int4, int4_groups
from tests.conftest import run_cli

ct = pytest.importorskip("compressed_tensors")


def reference_int4(w: np.ndarray, group_size: int):
    """The recipe in numpy float32, groups along the last axis."""
    g = w.astype(np.float32).reshape(*w.shape[:-1], -1, group_size)
    s = np.maximum(np.abs(g).max(-1, keepdims=True) * np.float32(1 / 7), np.float32(1e-5))
    q = np.clip(np.round(g / s), -7, 7)
    return q.reshape(w.shape).astype(np.int8), s[..., 0]


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def ct_decompress(packed, scale, shape, group_size) -> torch.Tensor:
    """compressed-tensors' own decompression of one pack-quantized weight."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size))
    state = {"weight_packed": torch.from_numpy(packed), "weight_scale": to_torch(scale),
             "weight_shape": torch.tensor(shape)}
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


@pytest.mark.parametrize("dtype,group_size,n_in", [("float32", 16, 64), ("bfloat16", 32, 64), ("float32", 4, 12)])
def test_quantizer_and_packing_match_the_recipe_and_compressed_tensors(dtype, group_size, n_in):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, n_in)).astype(np.float32)
    w[0, :group_size] = 0.0  # an all-zero group: the scale's floor 1e-5, q 0
    w = jnp.asarray(w).astype(dtype)
    q, s = int4_groups(w, group_size, -1)
    assert q.dtype == jnp.int8 and s.dtype == w.dtype and s.shape == (6, n_in // group_size)
    fake = fake_int4(w, group_size, -1)
    assert fake.dtype == w.dtype
    if dtype == "float32":
        want_q, want_s = reference_int4(np.asarray(w), group_size)
        np.testing.assert_array_equal(np.asarray(q), want_q)
        np.testing.assert_array_equal(np.asarray(s), want_s)
    assert np.abs(np.asarray(q)).max() == 7 and float(s[0, 0]) == float(jnp.asarray(1e-5, w.dtype))
    # the library's unpacking and dequantization of our packing, in the scale's dtype, is fake_int4 exactly
    got = ct_decompress(pack_int4(np.asarray(q)), np.asarray(s), w.shape, group_size)
    assert got.dtype == to_torch(np.asarray(s)).dtype
    np.testing.assert_array_equal(got.to(torch.float32).numpy(), np.asarray(fake.astype(jnp.float32)))


EXPERTS = ("experts_gate", "experts_up", "experts_down")


def test_qat_gradient_is_the_plain_gradient_at_the_quantized_weights():
    """jax.grad with qat on at w == jax.grad with qat off at w' (experts replaced by fake_int4(w)), for every
    parameter; and the QAT forward is not the plain one."""
    from glm5_jax.model import GLM5

    over = ["qat_group_size=16", "num_nextn_predict_layers=0", "num_hidden_layers=1", "first_k_dense_replace=0"]
    ids = jax.random.randint(jax.random.key(1), (2, 25), 0, 512)  # 24 inputs > index_topk 16: sparse top-k

    def grads(cfg, quantize_experts: bool, grad: bool = True):
        graphdef, params, buffers = nnx.split(GLM5(cfg, rngs=nnx.Rngs(0)), nnx.Param, ...)
        if quantize_experts:
            params = jax.tree_util.tree_map_with_path(
                lambda path, v: fake_int4(v, 16, -2) if str(path[-2].key) in EXPERTS else v, params)

        def loss(params):
            logits = nnx.merge(graphdef, params, buffers)(ids[:, :-1], mtp_depths=0).logits
            return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1).mean()

        return jax.jit(jax.value_and_grad(loss) if grad else loss)(params)

    (l_qat, g_qat), (l_ref, g_ref) = grads(config_lib.load("tiny", over + ["qat=int4"]), False), grads(
        config_lib.load("tiny", over), True)
    assert l_qat == l_ref
    flat_qat, flat_ref = nnx.to_flat_state(g_qat), nnx.to_flat_state(g_ref)
    assert [k for k, _ in flat_qat] == [k for k, _ in flat_ref]
    checked = 0
    for (path, a), (_, b) in zip(flat_qat, flat_ref):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
        checked += path[-1] in EXPERTS
    assert checked == 3 * 1  # the one MoE stack's three expert matrices
    assert abs(float(grads(config_lib.load("tiny", over), False, grad=False)) - float(l_qat)) > 1e-6


def test_int4_export_decompresses_to_the_qat_forward(hf_model_dir, tmp_path):
    """hf -> orbax with qat=int4 -> orbax-to-hf --quantize int4; compressed-tensors dequantizes the export to
    fake_int4 of the checkpoint's expert weights bit for bit, and transformers on the dequantized weights
    computes `glm5 forward`'s logits."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    from glm5_jax.checkpoint.store import CheckpointReader
    from glm5_jax.convert.names import hf_entries
    from tests.test_roundtrip import read_dir

    src, model = hf_model_dir(seed=7, mtp=True)
    ckpt, out, deq = tmp_path / "ckpt", tmp_path / "int4", tmp_path / "dequantized"
    assert run_cli("convert", "hf-to-orbax", "--hf-dir", src, "--out", ckpt, "--override", "qat=int4",
                   "--override", "qat_group_size=16", "-q") == 0
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", ckpt, "--out", out, "--dtype", "float32",
                   "--quantize", "int4", "--max-shard-size", "300KB", "-q") == 0
    hf_config = json.load(open(out / "config.json"))
    assert not {"qat", "qat_group_size"} & set(hf_config)
    weights = hf_config["quantization_config"]["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["strategy"]) == (4, 16, "group")
    exported = read_dir(str(out))
    expert = "model.layers.3.mlp.experts.5.down_proj."
    assert exported[expert + "weight_packed"].dtype == np.int32 and expert + "weight" not in exported
    assert exported[expert + "weight_packed"].shape == (64, 4) and exported[expert + "weight_scale"].shape == (64, 2)

    convert_checkpoint(str(out), str(deq), CompressedTensorsDequantizer(str(out), dtype=torch.float32), device="cpu")
    dequantized = read_dir(str(deq))
    reader = CheckpointReader(str(ckpt))
    cfg = reader.config
    forward = {}  # the QAT forward's expert weights: fake_int4 of the stored [stack, E, in, out] arrays
    source = read_dir(src)
    checked = 0
    for e in hf_entries(cfg):
        if e.path.endswith(EXPERTS):
            if e.path not in forward:
                stored = jnp.asarray(reader.open(e.path).read().result()).astype(cfg.dtype)
                forward[e.path] = np.asarray(fake_int4(stored, cfg.qat_group_size, -2))
            want, checked = e.to_hf(forward[e.path][e.index]), checked + 1
        else:
            want = source[e.hf]
        got = dequantized[e.hf]
        assert got.dtype == want.dtype and np.array_equal(got, want), e.hf
    assert checked == 3 * cfg.n_routed_experts * 3  # two MoE layers and the MTP layer

    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))  # 40 > index_topk 16: sparse top-k
    np.save(tmp_path / "ids.npy", ids)
    assert run_cli("forward", "--checkpoint", ckpt, "--input-ids", tmp_path / "ids.npy",
                   "--output", tmp_path / "logits.npy") == 0
    hf = transformers.GlmMoeDsaForCausalLM.from_pretrained(deq, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
        plain = model(torch.from_numpy(ids)).logits.numpy()
    got = np.load(tmp_path / "logits.npy")
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"QAT forward vs transformers on the dequantized export: max abs err / max abs logit = {rel:.2e}")
    assert rel < 1e-5
    assert np.abs(got - plain).max() / np.abs(plain).max() > 1e-3  # INT4 moved the logits: the check has teeth


@pytest.mark.parametrize("overrides,message", [
    (["num_hidden_layers=2", "num_nextn_predict_layers=0"],
     "qat: int4 quantizes the routed experts, and this model has none (no sparse layer, no MTP layer)"),
    (["qat_group_size=24"], "qat_group_size: must divide hidden_size (64), the input dimension of the routed "
                            "experts' gate/up projections; got 24"),
    (["qat_group_size=64"], "qat_group_size: must divide moe_intermediate_size (32), the input dimension of the "
                            "routed experts' down projections; got 64"),
])
def test_bad_qat_settings_fail_in_one_line(overrides, message, tmp_path, capsys):
    argv = ["init", "--config", "tiny", "--out", tmp_path / "ckpt", "--override", "qat=int4"]
    assert run_cli(*argv, *[a for o in overrides for a in ("--override", o)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"glm5: error: {message}"]
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ConfigError, match="qat"):
        config_lib.load("tiny", ["qat=int4", *overrides])


def test_quantize_needs_a_qat_checkpoint(tmp_path, capsys):
    ckpt, out = tmp_path / "ckpt", tmp_path / "int4"
    assert run_cli("init", "--config", "tiny", "--out", ckpt) == 0
    capsys.readouterr()
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", ckpt, "--out", out, "--quantize", "int4", "-q") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"glm5: error: --quantize int4: {ckpt} step 0 was trained with qat: none, so its forward uses "
                   "float expert weights; train (or fine-tune) with qat=int4"]
    assert not out.exists()


def test_qat_under_expert_parallelism_matches_one_device():
    """Experts sharded over `expert`, their input dimension over `fsdp` and `tensor`: the quantizer's groups
    span shards, and loss and gradients still equal the single-device QAT step's."""
    import dataclasses

    from glm5_jax.model import GLM5
    from glm5_jax.sharding import expert
    from glm5_jax.sharding.context import Parallelism
    from glm5_jax.sharding.layout import ParallelConfig
    from glm5_jax.train import step as S
    from tests.step_util import loss_and_grads, two_document_batch

    cfg = config_lib.load("tiny", ["expert_matmul=tiled", "qat=int4", "qat_group_size=16", "num_hidden_layers=1",
                                   "first_k_dense_replace=0", "num_nextn_predict_layers=0"])
    state = S.split(GLM5(cfg, rngs=nnx.Rngs(0)))
    batch = two_document_batch(cfg.vocab_size, 8, 32, split=20)
    (loss0, _), grads0 = loss_and_grads(state, batch)
    par = dataclasses.replace(Parallelism.create(ParallelConfig(mesh=dict(expert=2, fsdp=2, tensor=2))),
                              ragged_exchange=expert.emulated_ragged_all_to_all)
    (loss, _), grads = loss_and_grads(S.place(state, par), batch, par)
    assert abs(float(loss) - float(loss0)) <= 1e-5 * abs(float(loss0))
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0), strict=True):
        assert float(jnp.linalg.norm(g - g0)) <= 1e-5 * float(jnp.linalg.norm(g0))
