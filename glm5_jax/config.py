"""Typed model configuration: YAML presets, HF ``config.json`` in and out, ``key=value`` overrides
(`glm5_jax.values`, the mechanism every config shares).

Field names mirror transformers' ``GlmMoeDsaConfig`` so a config moves between the two ecosystems
unchanged; the fields after ``num_nextn_predict_layers`` are this stack's own (compute settings).
Every problem is reported as one :class:`ConfigError` line naming the key, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from glm5_jax.errors import ConfigError
from glm5_jax.values import apply_overrides, build, choice, fail, is_number, read_json, read_yaml_mapping

log = logging.getLogger(__name__)

MODEL_TYPE = "glm_moe_dsa"
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
EXPERT_MATMULS = ("auto", "ragged_dot", "tiled")
ROPE_TYPES = ("default", "linear")
QAT_MODES = ("none", "int4")


@dataclasses.dataclass
class ModelConfig:
    # --- transformers GlmMoeDsaConfig fields (defaults: the released GLM-5) ---
    vocab_size: int = 154880
    hidden_size: int = 6144
    intermediate_size: int = 12288
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 78
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int = 2048
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    qk_nope_head_dim: int = 192
    n_group: int = 1
    topk_group: int = 1
    num_experts_per_tok: int = 8
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 202752
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    pad_token_id: int | None = 154820
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = dataclasses.field(default_factory=lambda: [154820, 154827, 154829])
    tie_word_embeddings: bool = False
    rope_parameters: dict = dataclasses.field(default_factory=lambda: {"rope_type": "default", "rope_theta": 1e6})
    mlp_layer_types: list[str] | None = None  # None: first_k_dense_replace "dense", then "sparse"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 32
    mlp_bias: bool = False
    first_k_dense_replace: int = 3
    indexer_types: list[str] | None = None  # None: every layer "full"
    num_nextn_predict_layers: int = 1  # MTP parameter sets stored after the main layers (0 or 1)
    # --- this stack's own settings ---
    mtp_depths: int = 3  # prediction depths run with the one shared MTP parameter set
    indexer_relu: bool = True  # ReLU on indexer logits (transformers: on; Megatron's GLM-5: off)
    dtype: str = "float32"  # compute dtype of activations and matmuls
    param_dtype: str = "float32"  # storage dtype of parameters
    remat_policy: str = "none"  # what a scanned layer keeps for the backward pass
    attention_query_block: int = 256  # queries per block in sparse (top-k) attention
    logits_block: int = 2048  # positions per block of the LM / MTP heads in the training loss
    expert_matmul: str = "auto"  # ragged_dot (grouped GEMM), tiled (portable loop), auto: ragged_dot on TPU, else tiled
    expert_tile: int = 64  # rows per tile of the tiled expert matmul
    qat: str = "none"  # int4: the routed experts compute with fake-quantized INT4 weights (glm5_jax/model/quant.py)
    qat_group_size: int = 128  # INT4 group: consecutive elements along an expert matrix's input dimension

    def __post_init__(self):
        if self.mlp_layer_types is None:
            n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
            self.mlp_layer_types = ["dense"] * n_dense + ["sparse"] * (self.num_hidden_layers - n_dense)
        if self.indexer_types is None:
            self.indexer_types = ["full"] * self.num_hidden_layers
        self.mlp_layer_types = list(self.mlp_layer_types)
        self.indexer_types = list(self.indexer_types)
        if not isinstance(self.rope_parameters, dict):
            fail("rope_parameters", f"must be a mapping like {{rope_type: default, rope_theta: 1000000.0}}; "
                                    f"got {self.rope_parameters!r}")
        self.rope_parameters = dict(self.rope_parameters)

    # ----- derived sizes -----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def shared_intermediate_size(self) -> int:
        return self.moe_intermediate_size * self.n_shared_experts

    @property
    def rope_theta(self) -> float:
        return float(self.rope_parameters["rope_theta"])

    @property
    def has_mtp(self) -> bool:
        return self.num_nextn_predict_layers > 0

    def validate(self) -> ModelConfig:
        """Raise :class:`ConfigError` for the first invalid value; return self."""
        _validate(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)



_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
HF_FIELDS = tuple(_FIELDS[: _FIELDS.index("num_nextn_predict_layers") + 1])  # the ones config.json carries

# Keys an HF config.json carries that say nothing about the architecture, or repeat a derived value.
_HF_IGNORED = {
    "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache", "output_router_logits",
    "_name_or_path", "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "model_type", "head_dim", "qk_head_dim",
    "layer_types", "ep_size", "auto_map", "tokenizer_class", "num_experts", "max_window_layers",
}


def _check_positive(cfg: ModelConfig, *keys: str):
    for key in keys:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            fail(key, f"must be a positive integer, got {value!r}")


def _validate(cfg: ModelConfig):
    _check_positive(
        cfg, "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "kv_lora_rank",
        "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
        "num_experts_per_tok", "max_position_embeddings", "index_topk", "index_head_dim", "index_n_heads",
        "mtp_depths", "attention_query_block", "logits_block", "expert_tile", "qat_group_size",
    )
    for f in dataclasses.fields(cfg):  # every float setting is a finite number (NaN, inf or text is nonsense)
        if f.type in ("float", float) and not is_number(getattr(cfg, f.name)):
            fail(f.name, f"must be a finite number; got {getattr(cfg, f.name)!r}")
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        fail("num_key_value_heads", f"MLA needs one KV head per query head ({cfg.num_attention_heads}); "
              f"got {cfg.num_key_value_heads}")
    if cfg.qk_rope_head_dim % 2:
        fail("qk_rope_head_dim", f"RoPE rotates pairs, so it must be even; got {cfg.qk_rope_head_dim}")
    if cfg.index_head_dim < cfg.qk_rope_head_dim:
        fail("index_head_dim", f"must be >= qk_rope_head_dim ({cfg.qk_rope_head_dim}) since RoPE covers its "
              f"first qk_rope_head_dim dims; got {cfg.index_head_dim}")
    if cfg.n_routed_experts % cfg.n_group:
        fail("n_group", f"must divide n_routed_experts ({cfg.n_routed_experts}); got {cfg.n_group}")
    if cfg.n_group > 1 and cfg.n_routed_experts // cfg.n_group < 2:
        fail("n_group", "group scores sum the top-2 experts of a group, so groups need >= 2 experts")
    if cfg.topk_group > cfg.n_group:
        fail("topk_group", f"must be <= n_group ({cfg.n_group}); got {cfg.topk_group}")
    selectable = cfg.topk_group * (cfg.n_routed_experts // cfg.n_group)
    if cfg.num_experts_per_tok > selectable:
        fail("num_experts_per_tok", f"must be <= topk_group * experts per group ({selectable}); "
              f"got {cfg.num_experts_per_tok}")
    choice("hidden_act", cfg.hidden_act, ("silu",))
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if getattr(cfg, key):
            fail(key, "GLM-5 has none; only false is supported")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        fail("first_k_dense_replace", f"must be in [0, num_hidden_layers={cfg.num_hidden_layers}]; "
              f"got {cfg.first_k_dense_replace}")
    for key, allowed in (("mlp_layer_types", ("dense", "sparse")), ("indexer_types", ("full", "shared"))):
        types = getattr(cfg, key)
        if len(types) != cfg.num_hidden_layers:
            fail(key, f"needs one entry per layer ({cfg.num_hidden_layers}); got {len(types)}")
        for i, t in enumerate(types):
            if t not in allowed:
                fail(f"{key}[{i}]", f"must be one of {', '.join(allowed)}; got {t!r}")
    if cfg.indexer_types[0] != "full":
        fail("indexer_types[0]", "a 'shared' layer reuses the previous full layer's top-k, so layer 0 must be 'full'")
    if cfg.num_nextn_predict_layers not in (0, 1):
        fail("num_nextn_predict_layers", f"must be 0 or 1 (depths share one parameter set); "
              f"got {cfg.num_nextn_predict_layers}")
    choice("dtype", cfg.dtype, DTYPES)
    choice("param_dtype", cfg.param_dtype, DTYPES)
    choice("remat_policy", cfg.remat_policy, REMAT_POLICIES)
    choice("expert_matmul", cfg.expert_matmul, EXPERT_MATMULS)
    _validate_qat(cfg)
    rope = cfg.rope_parameters
    choice("rope_parameters.rope_type", rope.get("rope_type", "default"), ROPE_TYPES)
    theta = rope.get("rope_theta")
    if not is_number(theta) or theta <= 0:
        fail("rope_parameters.rope_theta", f"must be a positive number; got {theta!r}")
    if rope.get("rope_type", "default") == "linear":
        factor = rope.get("factor")
        if not is_number(factor) or factor < 1:
            fail("rope_parameters.factor", f"linear scaling needs a factor >= 1; got {factor!r}")
    if not 0 <= cfg.attention_dropout < 1:
        fail("attention_dropout", f"must be in [0, 1); got {cfg.attention_dropout}")
    if cfg.rms_norm_eps <= 0:
        fail("rms_norm_eps", f"must be positive; got {cfg.rms_norm_eps}")


def _validate_qat(cfg: ModelConfig):
    if choice("qat", cfg.qat, QAT_MODES) == "none":
        return
    if "sparse" not in cfg.mlp_layer_types and not cfg.has_mtp:
        fail("qat", "int4 quantizes the routed experts, and this model has none (no sparse layer, no MTP layer)")
    for dim, what in (("hidden_size", "gate/up"), ("moe_intermediate_size", "down")):
        if getattr(cfg, dim) % cfg.qat_group_size:
            fail("qat_group_size", f"must divide {dim} ({getattr(cfg, dim)}), the input dimension of the routed "
                 f"experts' {what} projections; got {cfg.qat_group_size}")


def from_dict(values: dict) -> ModelConfig:
    """Build and validate a config from a plain dict; unknown keys are errors."""
    return build(ModelConfig, values, what="model config").validate()



# A model YAML states its sizes: these keys, or a `preset:` it starts from (the defaults are the 744B model).
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "num_attention_heads", "n_routed_experts")


def load(source: str, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """Load a model config from a preset name, a YAML file, or an HF ``config.json``, then apply overrides."""
    if os.path.isdir(source):
        source = os.path.join(source, "config.json")
    if source.endswith(".json"):
        values = hf_to_dict(read_json(source))
    else:
        values = read_model_yaml(source)
    return from_dict(apply_overrides(values, overrides))


def read_model_yaml(source: str, seen: tuple[str, ...] = ()) -> dict:
    """A model YAML's values: its `preset:` (a preset name or YAML file) overlaid with its own keys, or every
    size key (SIZE_KEYS) given; an empty or size-less file is an error, never the 744B defaults."""
    values = read_yaml_mapping(source, "models", "model")
    values = dict(values.get("model", values))
    preset = values.pop("preset", None)
    if preset is not None:
        if not isinstance(preset, str) or preset in seen:
            raise ConfigError(f"{source}: preset: must name another model preset or YAML file; got {preset!r}")
        return {**read_model_yaml(preset, (*seen, source)), **values}
    missing = [k for k in SIZE_KEYS if k not in values]
    if missing:
        raise ConfigError(f"{source}: a model file names the preset it starts from (preset: tiny, say) or sets "
                          f"its sizes; missing {', '.join(missing)}")
    return values



def hf_to_dict(hf: dict) -> dict:
    """Translate an HF ``config.json`` dict into ModelConfig keys, rejecting other architectures."""
    model_type = hf.get("model_type")
    if model_type != MODEL_TYPE:
        raise ConfigError(f"model_type: only {MODEL_TYPE!r} (GLM-5) is supported; got {model_type!r}")
    if "quantization_config" in hf:
        method = hf["quantization_config"].get("quant_method", "?")
        raise ConfigError(f"quantization_config: quantized checkpoints ({method}) are not supported; "
                          "convert the bfloat16 release")
    hf = dict(hf)
    values: dict[str, Any] = {}
    # Older exports carry rope_theta / rope_scaling at the top level.
    rope = dict(hf.pop("rope_parameters", None) or {})
    if "rope_theta" in hf:
        rope.setdefault("rope_theta", hf.pop("rope_theta"))
    if hf.get("rope_scaling"):
        rope.update(hf.pop("rope_scaling"))
        rope.setdefault("rope_type", rope.pop("type", "default"))
    hf.pop("rope_scaling", None)
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", 10000.0)  # transformers' default when config.json names none
    values["rope_parameters"] = rope
    # The indexer schedule keys that transformers expands into indexer_types.
    pattern, freq, offset = hf.pop("index_topk_pattern", None), hf.pop("index_topk_freq", None), hf.pop(
        "index_skip_topk_offset", None)
    if hf.get("indexer_types") is None and (pattern is not None or freq is not None):
        n = hf.get("num_hidden_layers", ModelConfig.num_hidden_layers)
        if pattern is not None:
            if isinstance(pattern, str) and set(pattern) - {"F", "S"}:
                raise ConfigError(f"index_topk_pattern: letters must be F (full) or S (shared); got {pattern!r}")
            hf["indexer_types"] = [{"F": "full", "S": "shared"}[c] for c in pattern] if isinstance(
                pattern, str) else list(pattern)
        else:
            freq, offset = max(freq, 1), 2 if offset is None else offset
            hf["indexer_types"] = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n)]
    for key, expected in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if key in hf and hf.pop(key) != expected:
            raise ConfigError(f"{key}: GLM-5 uses {expected!r}; other values are not supported")
    ignored = []
    for key, value in hf.items():
        if key in HF_FIELDS:
            values[key] = value
        elif key not in _HF_IGNORED:
            ignored.append(key)
    if ignored:
        log.warning("config.json keys not used by glm5-jax: %s", ", ".join(sorted(ignored)))
    return values


def to_hf_dict(cfg: ModelConfig) -> dict:
    """The ``config.json`` transformers loads as ``GlmMoeDsaConfig``."""
    out = {"architectures": ["GlmMoeDsaForCausalLM"], "model_type": MODEL_TYPE}
    for key in HF_FIELDS:
        out[key] = getattr(cfg, key)
    out["head_dim"] = cfg.qk_rope_head_dim
    out["dtype"] = cfg.param_dtype
    return out


def save_hf_config(cfg: ModelConfig, path: str, dtype: str | None = None, quantization: dict | None = None):
    """Write `to_hf_dict(cfg)`, with `dtype` and a `quantization_config` when given."""
    out = to_hf_dict(cfg)
    if dtype:
        out["dtype"] = dtype
    if quantization:
        out["quantization_config"] = quantization
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
