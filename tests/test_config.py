"""Model config: presets, the released 744B shapes, one-line validation errors, HF config.json both ways."""

from __future__ import annotations

import math

import pytest
import transformers

from glm5_jax import config
from glm5_jax.checkpoint.store import abstract_leaves
from tests.conftest import TINY, run_cli


def test_744b_preset_has_the_released_parameter_count():
    cfg = config.load("glm5-744b")
    leaves = abstract_leaves(cfg)
    total = sum(math.prod(s.shape) for n, s in leaves.items() if not n.endswith("e_score_correction_bias"))
    mtp = sum(math.prod(s.shape) for n, s in leaves.items() if n.startswith("mtp."))
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    moe_layers = cfg.mlp_layer_types.count("sparse")
    inactive = moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * expert
    inactive += math.prod(leaves["embed_tokens"].shape)  # a row lookup, not a matmul: not counted as active
    print(f"GLM-5: {(total - mtp) / 1e9:.1f}B without MTP, {total / 1e9:.1f}B with, "
          f"{(total - mtp - inactive) / 1e9:.1f}B active per token")
    assert 743e9 < total - mtp < 746e9
    assert 753e9 < total < 756e9
    assert 40.5e9 < total - mtp - inactive < 41e9


def test_presets_and_overrides():
    tiny = config.load("tiny", ["index_topk=8", "rope_parameters.rope_theta=500000", "dtype=bfloat16"])
    assert tiny.index_topk == 8 and tiny.rope_theta == 5e5 and tiny.dtype == "bfloat16"
    assert tiny.mlp_layer_types == ["dense", "dense", "sparse", "sparse"]
    assert tiny.indexer_types == ["full"] * 4


@pytest.mark.parametrize("override,message", [
    ("index_topk=0", "index_topk: must be a positive integer, got 0"),
    ("index_top_k=4", "index_top_k: unknown model config key (did you mean 'index_topk'?)"),
    ("n_group=3", "n_group: must divide n_routed_experts (8); got 3"),
    ("topk_group=3", "topk_group: must be <= n_group (2); got 3"),
    ("num_experts_per_tok=5", "num_experts_per_tok: must be <= topk_group * experts per group (4); got 5"),
    ("num_key_value_heads=2", "num_key_value_heads: MLA needs one KV head per query head (4); got 2"),
    ("indexer_types=[shared,full,full,full]", "indexer_types[0]: a 'shared' layer reuses"),
    ("indexer_types=[full,full]", "indexer_types: needs one entry per layer (4); got 2"),
    ("mlp_layer_types=[dense,moe,sparse,sparse]", "mlp_layer_types[1]: must be one of dense, sparse; got 'moe'"),
    ("dtype=float16", "dtype: must be one of float32, bfloat16; got 'float16'"),
    ("rope_parameters.rope_type=yarn", "rope_parameters.rope_type: must be one of default, linear; got 'yarn'"),
    ("tie_word_embeddings=true", "tie_word_embeddings: GLM-5 has none"),
    ("num_nextn_predict_layers=2", "num_nextn_predict_layers: must be 0 or 1"),
])
def test_invalid_values_raise_one_line(override, message):
    with pytest.raises(config.ConfigError) as err:
        config.load("tiny", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_cli_reports_config_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nhidden_size: 64\nnum_attention_heads: [4]\n")
    code = run_cli("forward", "--checkpoint", tmp_path, "--input-ids", tmp_path / "x.npy", "--output", tmp_path / "y")
    assert code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(config.ConfigError, match="num_attention_heads: must be a positive integer"):
        config.load(str(bad))
    with pytest.raises(config.ConfigError, match="model preset 'nope' does not exist; presets: glm5-744b, glm5-proxy-1gpu, tiny"):
        config.load("nope")


def test_hf_config_both_ways(tmp_path):
    hf_cfg = transformers.GlmMoeDsaConfig(**TINY, indexer_types=["full", "shared", "full", "shared"])
    hf_cfg.save_pretrained(tmp_path)
    ours = config.load(str(tmp_path / "config.json"))
    for key in ("hidden_size", "index_topk", "n_group", "indexer_types", "mlp_layer_types", "rope_parameters"):
        assert getattr(ours, key) == getattr(hf_cfg, key), key
    out = tmp_path / "back"
    out.mkdir()
    config.save_hf_config(ours, str(out / "config.json"))
    back = transformers.AutoConfig.from_pretrained(out)
    assert type(back) is transformers.GlmMoeDsaConfig
    for key in config.HF_FIELDS:
        if key != "num_nextn_predict_layers":
            assert getattr(back, key) == getattr(ours, key), key


def test_hf_config_legacy_keys_and_rejections(tmp_path):
    base = {"model_type": "glm_moe_dsa", **TINY, "rope_theta": 1e6, "index_topk_pattern": "FSSF"}
    values = config.hf_to_dict(base)
    cfg = config.from_dict(values)
    assert cfg.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}
    assert cfg.indexer_types == ["full", "shared", "shared", "full"]
    with pytest.raises(config.ConfigError, match="quantization_config: quantized checkpoints"):
        config.hf_to_dict({**base, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(config.ConfigError, match="scoring_func: GLM-5 uses 'sigmoid'"):
        config.hf_to_dict({**base, "scoring_func": "softmax"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(config.ConfigError, match="not valid JSON"):
        config.load(str(tmp_path))
