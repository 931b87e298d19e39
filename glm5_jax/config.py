"""Typed model configuration: YAML presets, HF ``config.json`` in and out, ``key=value`` overrides.

Field names mirror transformers' ``GlmMoeDsaConfig`` so a config moves between the two ecosystems
unchanged; the fields after ``num_nextn_predict_layers`` are this stack's own (compute settings).
Every problem is reported as one :class:`ConfigError` line naming the key, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import logging
import os
import re
from typing import Any

import yaml

log = logging.getLogger(__name__)

MODEL_TYPE = "glm_moe_dsa"
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
EXPERT_MATMULS = ("auto", "ragged_dot", "tiled")
ROPE_TYPES = ("default", "linear")


class ConfigError(ValueError):
    """An invalid configuration: the message is one line naming the key and what is allowed."""


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
    expert_matmul: str = "auto"  # ragged_dot (grouped GEMM), tiled (portable loop), auto: tiled on CPU only
    expert_tile: int = 64  # rows per tile of the tiled expert matmul

    def __post_init__(self):
        if self.mlp_layer_types is None:
            n_dense = min(self.first_k_dense_replace, self.num_hidden_layers)
            self.mlp_layer_types = ["dense"] * n_dense + ["sparse"] * (self.num_hidden_layers - n_dense)
        if self.indexer_types is None:
            self.indexer_types = ["full"] * self.num_hidden_layers
        self.mlp_layer_types = list(self.mlp_layer_types)
        self.indexer_types = list(self.indexer_types)
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


def _fail(key: str, message: str):
    raise ConfigError(f"{key}: {message}")


def _check_positive(cfg: ModelConfig, *keys: str):
    for key in keys:
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(key, f"must be a positive integer, got {value!r}")


def _check_choice(key: str, value, allowed):
    if value not in allowed:
        _fail(key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _validate(cfg: ModelConfig):
    _check_positive(
        cfg, "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "n_shared_experts", "n_routed_experts", "kv_lora_rank",
        "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
        "num_experts_per_tok", "max_position_embeddings", "index_topk", "index_head_dim", "index_n_heads",
        "mtp_depths", "attention_query_block", "logits_block", "expert_tile",
    )
    if cfg.num_key_value_heads != cfg.num_attention_heads:
        _fail("num_key_value_heads", f"MLA needs one KV head per query head ({cfg.num_attention_heads}); "
              f"got {cfg.num_key_value_heads}")
    if cfg.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", f"RoPE rotates pairs, so it must be even; got {cfg.qk_rope_head_dim}")
    if cfg.index_head_dim < cfg.qk_rope_head_dim:
        _fail("index_head_dim", f"must be >= qk_rope_head_dim ({cfg.qk_rope_head_dim}) since RoPE covers its "
              f"first qk_rope_head_dim dims; got {cfg.index_head_dim}")
    if cfg.n_routed_experts % cfg.n_group:
        _fail("n_group", f"must divide n_routed_experts ({cfg.n_routed_experts}); got {cfg.n_group}")
    if cfg.n_group > 1 and cfg.n_routed_experts // cfg.n_group < 2:
        _fail("n_group", "group scores sum the top-2 experts of a group, so groups need >= 2 experts")
    if cfg.topk_group > cfg.n_group:
        _fail("topk_group", f"must be <= n_group ({cfg.n_group}); got {cfg.topk_group}")
    selectable = cfg.topk_group * (cfg.n_routed_experts // cfg.n_group)
    if cfg.num_experts_per_tok > selectable:
        _fail("num_experts_per_tok", f"must be <= topk_group * experts per group ({selectable}); "
              f"got {cfg.num_experts_per_tok}")
    _check_choice("hidden_act", cfg.hidden_act, ("silu",))
    for key in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
        if getattr(cfg, key):
            _fail(key, "GLM-5 has none; only false is supported")
    if not 0 <= cfg.first_k_dense_replace <= cfg.num_hidden_layers:
        _fail("first_k_dense_replace", f"must be in [0, num_hidden_layers={cfg.num_hidden_layers}]; "
              f"got {cfg.first_k_dense_replace}")
    for key, allowed in (("mlp_layer_types", ("dense", "sparse")), ("indexer_types", ("full", "shared"))):
        types = getattr(cfg, key)
        if len(types) != cfg.num_hidden_layers:
            _fail(key, f"needs one entry per layer ({cfg.num_hidden_layers}); got {len(types)}")
        for i, t in enumerate(types):
            if t not in allowed:
                _fail(f"{key}[{i}]", f"must be one of {', '.join(allowed)}; got {t!r}")
    if cfg.indexer_types[0] != "full":
        _fail("indexer_types[0]", "a 'shared' layer reuses the previous full layer's top-k, so layer 0 must be 'full'")
    if cfg.num_nextn_predict_layers not in (0, 1):
        _fail("num_nextn_predict_layers", f"must be 0 or 1 (depths share one parameter set); "
              f"got {cfg.num_nextn_predict_layers}")
    _check_choice("dtype", cfg.dtype, DTYPES)
    _check_choice("param_dtype", cfg.param_dtype, DTYPES)
    _check_choice("remat_policy", cfg.remat_policy, REMAT_POLICIES)
    _check_choice("expert_matmul", cfg.expert_matmul, EXPERT_MATMULS)
    rope = cfg.rope_parameters
    _check_choice("rope_parameters.rope_type", rope.get("rope_type", "default"), ROPE_TYPES)
    theta = rope.get("rope_theta")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        _fail("rope_parameters.rope_theta", f"must be a positive number; got {theta!r}")
    if rope.get("rope_type", "default") == "linear":
        factor = rope.get("factor")
        if not isinstance(factor, (int, float)) or factor < 1:
            _fail("rope_parameters.factor", f"linear scaling needs a factor >= 1; got {factor!r}")
    if not 0 <= cfg.attention_dropout < 1:
        _fail("attention_dropout", f"must be in [0, 1); got {cfg.attention_dropout}")
    if cfg.rms_norm_eps <= 0:
        _fail("rms_norm_eps", f"must be positive; got {cfg.rms_norm_eps}")


def unknown_key(key: str, known, what: str = "model config") -> ConfigError:
    """The error for a key that is not a field, suggesting the closest known one."""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{key}: unknown {what} key{hint}")


def from_dict(values: dict) -> ModelConfig:
    """Build and validate a config from a plain dict; unknown keys are errors."""
    for key in values:
        if key not in _FIELDS:
            raise unknown_key(key, _FIELDS)
    try:
        cfg = ModelConfig(**values)
    except TypeError as e:  # e.g. a list where a dict belongs
        raise ConfigError(f"model config: {e}") from None
    return cfg.validate()


def preset_path(name: str, folder: str = "models", what: str = "model preset", skip=()) -> str:
    """Path of a shipped preset, ``configs/FOLDER/NAME.yaml``; an unknown name lists the presets."""
    root = importlib.resources.files("glm5_jax.configs") / folder
    path = root / f"{name}.yaml"
    if not path.is_file() or name in skip:
        names = sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml") and p.name[:-5] not in skip)
        raise ConfigError(f"{what} {name!r} does not exist; presets: {', '.join(names)}")
    return str(path)


def _config_path(source: str, folder: str, what: str, skip=()) -> str:
    """The file a config source names: an existing path, else the shipped preset of that name."""
    if os.path.isfile(source):
        return source
    looks_like_path = "/" in source or source.endswith((".yaml", ".yml"))
    if os.path.isdir(source) and (looks_like_path or not os.path.isfile(os.path.join(
            str(importlib.resources.files("glm5_jax.configs") / folder), f"{source}.yaml"))):
        raise ConfigError(f"{source}: is a directory, not a {what} config file")
    if looks_like_path:
        raise ConfigError(f"{source}: no such file")
    return preset_path(source, folder, f"{what} preset", skip)


_JSON_SCALARS = (str, int, float, bool, type(None))


def check_plain(value, key: str = "") -> None:
    """Raise ConfigError naming the key of the first value JSON cannot hold (a YAML date, set, binary...)."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise ConfigError(f"{key or 'config'}: key {k!r} must be a string")
            check_plain(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_plain(v, f"{key}.{i}")
    elif not isinstance(value, _JSON_SCALARS):
        hint = " (quote it to make it a string)" if type(value).__name__ in ("date", "datetime") else ""
        raise ConfigError(f"{key}: a {type(value).__name__} value is not allowed, only strings, numbers, "
                          f"booleans, null, lists and mappings; got {value!s}{hint}")


def read_yaml_mapping(source: str, folder: str, what: str, skip=()) -> dict:
    """The mapping in a YAML file, or in the shipped preset of that name (``configs/FOLDER/``).

    `what` ("model", "data", "recipe", "layout") names the kind of config in error messages.
    """
    path = _config_path(source, folder, what, skip)
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a {what} config is a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a {what} config must be a mapping of keys to values")
    check_plain(values)
    return values


def load(source: str, overrides: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """Load a model config from a preset name, a YAML file, or an HF ``config.json``, then apply overrides."""
    if os.path.isdir(source):
        source = os.path.join(source, "config.json")
    if source.endswith(".json"):
        values = hf_to_dict(read_json(source))
    else:
        values = read_yaml_mapping(source, "models", "model")
        values = values.get("model", values)
    return from_dict(apply_overrides(values, overrides))


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: {part!r} is not an index of a list of {len(node)}")
    return int(part)


def _set(node, leaf: str, value, key: str, merge: bool = False):
    """node[leaf] = value; a mapping set on a list sets the items it indexes (merged into mapping items)."""
    if isinstance(node, list):
        i = _list_index(node, leaf, key)
        merge = merge and isinstance(node[i], dict) and isinstance(value, dict)
        node[i] = {**node[i], **value} if merge else value
    elif isinstance(node.get(leaf), list) and isinstance(value, dict):
        for k, v in value.items():  # {"0": {...}}: how nested dotted keys (data_overrides.stages.0.x) arrive
            _set(node[leaf], str(k), v, f"{key}.{k}", merge=True)
    else:
        node[leaf] = value


def apply_overrides(values: dict, overrides) -> dict:
    """Apply overrides: ``key=value`` strings (values parsed as YAML) or a mapping of dotted keys to values.

    ``a.b=v`` sets a nested key; a number indexes a list (``stages.0.seq_len=256``); a mapping set on a list
    (``stages={0: {seq_len: 256}}``, how nested dotted overrides arrive) sets the items it indexes.
    """
    check_plain(values)
    values = json.loads(json.dumps(values))  # deep copy of plain data
    for key, value in override_items(overrides):
        *parents, leaf = key.split(".")
        node = values
        for p in parents:
            node = node[_list_index(node, p, key)] if isinstance(node, list) else node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{key}: {p} is not a mapping")
        _set(node, leaf, value, key)
    return values


def override_items(overrides):
    """(dotted key, value) pairs of `key=value` strings (YAML values) or of a mapping (values as they are)."""
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            check_plain(value, key)
        return list(overrides.items())
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item}: overrides are key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: value {raw!r} is not valid YAML ({e.__class__.__name__})") from None
        if isinstance(value, str) and _FLOAT.fullmatch(value):  # YAML 1.1 reads 1e-4 (no dot) as text
            value = float(value)
        check_plain(value, key)
        items.append((key, value))
    return items


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


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


def save_hf_config(cfg: ModelConfig, path: str, dtype: str | None = None):
    out = to_hf_dict(cfg)
    if dtype:
        out["dtype"] = dtype
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
