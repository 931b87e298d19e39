"""Typed data configuration (tokenizer, named sources, context-extension stages) loaded from YAML.

Every problem is one :class:`~glm5_jax.errors.ConfigError` line naming the key (``stages.1.seq_len``) and
what is allowed, raised before any file is read.
"""

from __future__ import annotations

import dataclasses

from glm5_jax.config import ROPE_TYPES
from glm5_jax.errors import ConfigError
from glm5_jax.values import (apply_overrides, boolean, build, check_keys, choice, fail, is_number,
                             read_yaml_mapping)

from .errors import ON_ERROR

SOURCE_KINDS = ("stdlib", "jsonl", "parquet", "arrayrecord", "tokens", "stdlib_chat", "pattern")
EMBEDDED = ("stdlib", "stdlib_chat", "pattern")  # kinds built in, from no files
TOKENIZER_KINDS = ("bytes", "hf")
FORMATS = ("text", "chat", "prompts")  # a record is a document, a conversation (data/chat.py), or an RL prompt
# with the fields its reward checks (data/prompts.py)
OVERLONG = ("truncate", "drop")


@dataclasses.dataclass
class TokenizerConfig:
    kind: str = "bytes"  # bytes: built-in byte-level (259 ids + 16 chat markers); hf: tokenizer.json
    path: str | None = None  # tokenizer.json (kind hf); $VARS and ~ are expanded
    eos_id: int | None = None  # id put after every document; bytes: 1
    eos_token: str | None = None  # or the EOS token's text, looked up in tokenizer.json
    pad_id: int | None = None  # id written at padding (always loss-masked); default: eos_id (bytes: 0)


@dataclasses.dataclass
class SourceConfig:
    name: str = ""  # its key under `sources:`
    kind: str = "stdlib"  # one of SOURCE_KINDS
    paths: list[str] = dataclasses.field(default_factory=list)  # files or globs; $VARS and ~ are expanded
    text_field: str = "text"  # JSONL key / Parquet column holding the document (format chat: the messages)
    append_eos: bool = True  # put the tokenizer's EOS after each document (also pre-tokenized ones)
    format: str | None = None  # text: documents; chat: conversations with loss masks (jsonl, parquet; stdlib_chat);
    # prompts: RL prompts with their reward's fields (jsonl; pattern); None: chat for stdlib_chat, prompts for
    # pattern, else text
    template: str | None = None  # chat: a Hugging Face tokenizer folder or .jinja file to render with
    overlong: str = "truncate"  # chat: a conversation longer than the row: truncate (at a turn) or drop


@dataclasses.dataclass
class StageConfig:
    name: str = ""
    seq_len: int = 4096  # tokens per packed row
    tokens_per_step: int = 4096  # global: global batch = tokens_per_step / seq_len rows
    tokens: int = 4096  # token budget; the stage runs tokens // tokens_per_step steps
    mixture: dict[str, float] = dataclasses.field(default_factory=dict)  # source name -> weight
    rope: dict | None = None  # rope_parameters the trainer sets on the model for this stage (None: unchanged)
    # Batch-size warm-up: {start_tokens_per_step: N, tokens: T}: tokens per step grow linearly with the tokens
    # consumed, from N to tokens_per_step over the first T (stages.BatchRamp); None: tokens_per_step throughout.
    batch_ramp: dict | None = None

    @property
    def global_batch(self) -> int:
        return self.tokens_per_step // self.seq_len

    @property
    def steps(self) -> int:
        return self.tokens // self.tokens_per_step


@dataclasses.dataclass
class DataConfig:
    tokenizer: TokenizerConfig = dataclasses.field(default_factory=TokenizerConfig)
    sources: dict[str, SourceConfig] = dataclasses.field(default_factory=dict)
    stages: list[StageConfig] = dataclasses.field(default_factory=list)
    seed: int = 0  # shuffle seed; the same seed gives the same batches
    shuffle: bool = True  # global shuffle of each source's documents, reshuffled every epoch
    on_error: str = "skip"  # bad records: skip (count and log) or raise
    num_workers: int = 0  # Grain mp_prefetch worker processes per host (0: read in the trainer's process)
    worker_buffer_size: int = 2  # batches each worker keeps ready
    read_threads: int = 2  # threads per process reading and tokenizing documents
    read_buffer_size: int = 64  # documents read ahead per process

    def stage(self, name: str) -> StageConfig:
        for s in self.stages:
            if s.name == name:
                return s
        raise ConfigError(f"stage: no stage named {name!r}; stages: {', '.join(s.name for s in self.stages)}")


def _int(key: str, value, minimum: int = 1) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # YAML reads 1.8e13 as a float
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        fail(key, f"must be an integer >= {minimum}; got {value!r}")
    return value


def _tokenizer(values) -> TokenizerConfig:
    cfg = build(TokenizerConfig, values, "tokenizer.", "data config")
    choice("tokenizer.kind", cfg.kind, TOKENIZER_KINDS)
    if cfg.kind == "hf" and not cfg.path:
        fail("tokenizer.path", "kind hf needs the path of a tokenizer.json")
    if cfg.kind == "bytes" and (cfg.path or cfg.eos_id is not None or cfg.eos_token or cfg.pad_id is not None):
        fail("tokenizer", "kind bytes takes no path / eos_id / eos_token / pad_id (its ids are fixed)")
    for k in ("eos_id", "pad_id"):
        if getattr(cfg, k) is not None:
            _int(f"tokenizer.{k}", getattr(cfg, k), 0)
    return cfg


def _source(name, values) -> SourceConfig:
    key = f"sources.{name}"
    cfg = build(SourceConfig, values, f"{key}.", "data config", skip=("name",))
    cfg.name = str(name)
    choice(f"{key}.kind", cfg.kind, SOURCE_KINDS)
    if isinstance(cfg.paths, str):
        cfg.paths = [cfg.paths]
    if not isinstance(cfg.paths, list) or not all(isinstance(p, str) for p in cfg.paths):
        fail(f"{key}.paths", f"must be a list of file paths or globs; got {cfg.paths!r}")
    if cfg.kind in EMBEDDED and cfg.paths:
        fail(f"{key}.paths", f"kind {cfg.kind} is built in (no files); it takes no paths")
    if cfg.kind not in EMBEDDED and not cfg.paths:
        fail(f"{key}.paths", f"kind {cfg.kind} needs at least one file or glob")
    if not isinstance(cfg.text_field, str) or not cfg.text_field:
        fail(f"{key}.text_field", f"must be a non-empty string; got {cfg.text_field!r}")
    boolean(f"{key}.append_eos", cfg.append_eos)
    if cfg.format is None:
        cfg.format = {"stdlib_chat": "chat", "pattern": "prompts"}.get(cfg.kind, "text")
    choice(f"{key}.format", cfg.format, FORMATS)
    if cfg.kind == "stdlib_chat" and cfg.format != "chat":
        fail(f"{key}.format", "kind stdlib_chat holds conversations: its format is chat")
    if cfg.kind == "pattern" and cfg.format != "prompts":
        fail(f"{key}.format", "kind pattern holds RL prompts: its format is prompts")
    if cfg.format == "prompts":
        if cfg.kind not in ("jsonl", "pattern"):
            fail(f"{key}.format", f"kind {cfg.kind} holds no prompt records; prompts come from jsonl or pattern")
        if cfg.text_field == "text":
            cfg.text_field = "prompt"
    if cfg.format == "chat":
        if cfg.kind not in ("jsonl", "parquet", "stdlib_chat"):
            fail(f"{key}.format", f"kind {cfg.kind} holds no conversations; chat records come from jsonl, parquet "
                                  f"or stdlib_chat")
        if cfg.text_field == "text":
            cfg.text_field = "messages"
        choice(f"{key}.overlong", cfg.overlong, OVERLONG)
        if cfg.template is not None and (not isinstance(cfg.template, str) or not cfg.template):
            fail(f"{key}.template", f"must be the path of a tokenizer folder or .jinja file; got {cfg.template!r}")
    elif cfg.overlong != "truncate" or (cfg.template is not None and cfg.format != "prompts"):
        fail(f"{key}.{'template' if cfg.template is not None else 'overlong'}", "applies to format chat only")
    return cfg


def _rope(key: str, rope):
    if rope is None:
        return None
    if not isinstance(rope, dict):
        fail(key, f"must be a mapping like {{rope_theta: 1000000.0}}; got {rope!r}")
    rope = dict(rope)
    for k in rope:
        if k not in ("rope_type", "rope_theta", "factor"):
            fail(f"{key}.{k}", "unknown key; allowed: rope_type, rope_theta, factor")
    choice(f"{key}.rope_type", rope.setdefault("rope_type", "default"), ROPE_TYPES)
    theta = rope.get("rope_theta")
    if theta is not None and (not is_number(theta) or theta <= 0):
        fail(f"{key}.rope_theta", f"must be a positive number; got {theta!r}")
    if rope["rope_type"] == "linear":
        factor = rope.get("factor")
        if not is_number(factor) or factor < 1:
            fail(f"{key}.factor", f"linear scaling needs a factor >= 1; got {factor!r}")
    return rope


def _stage(i, values, sources) -> StageConfig:
    key = f"stages.{i}"
    cfg = build(StageConfig, values, f"{key}.", "data config")
    if not isinstance(cfg.name, str) or not cfg.name:
        fail(f"{key}.name", f"must be a non-empty string; got {cfg.name!r}")
    cfg.seq_len = _int(f"{key}.seq_len", cfg.seq_len)
    cfg.tokens_per_step = _int(f"{key}.tokens_per_step", cfg.tokens_per_step)
    cfg.tokens = _int(f"{key}.tokens", cfg.tokens)
    if cfg.tokens_per_step % cfg.seq_len:
        fail(f"{key}.tokens_per_step", f"must be a multiple of seq_len ({cfg.seq_len}) so the global batch "
              f"(tokens_per_step / seq_len rows) is whole; got {cfg.tokens_per_step}")
    if cfg.tokens < cfg.tokens_per_step:
        fail(f"{key}.tokens", f"the budget must cover at least one step ({cfg.tokens_per_step} tokens); "
              f"got {cfg.tokens}")
    if not isinstance(cfg.mixture, dict) or not cfg.mixture:
        fail(f"{key}.mixture", f"must map source names to weights; sources: {', '.join(sources)}")
    for name, weight in cfg.mixture.items():
        if name not in sources:
            fail(f"{key}.mixture.{name}", f"no such source; sources: {', '.join(sources)}")
        if not is_number(weight) or weight <= 0:
            fail(f"{key}.mixture.{name}", f"weight must be a positive finite number; got {weight!r}")
    cfg.rope = _rope(f"{key}.rope", cfg.rope)
    cfg.batch_ramp = _ramp(f"{key}.batch_ramp", cfg.batch_ramp, cfg)
    return cfg


RAMP_KEYS = ("start_tokens_per_step", "tokens")


def _ramp(key: str, ramp, stage: StageConfig):
    if ramp is None:
        return None
    if not isinstance(ramp, dict) or set(ramp) != set(RAMP_KEYS):
        fail(key, f"must be null or a mapping with exactly {', '.join(RAMP_KEYS)}; got {ramp!r}")
    start = _int(f"{key}.start_tokens_per_step", ramp["start_tokens_per_step"])
    if start % stage.seq_len or start > stage.tokens_per_step:
        fail(f"{key}.start_tokens_per_step", f"must be a multiple of seq_len ({stage.seq_len}) and at most "
              f"tokens_per_step ({stage.tokens_per_step}); got {start}")
    return {"start_tokens_per_step": start, "tokens": _int(f"{key}.tokens", ramp["tokens"])}


def from_dict(values: dict) -> DataConfig:
    """Build and validate a :class:`DataConfig` from plain data (e.g. parsed YAML)."""
    check_keys(DataConfig, values, "", "data config")
    values = dict(values)
    tokenizer = _tokenizer(values.pop("tokenizer", None) or {})
    raw_sources = values.pop("sources", None)
    if not isinstance(raw_sources, dict) or not raw_sources:
        fail("sources", "must map at least one source name to its settings")
    sources = {str(name): _source(name, s or {}) for name, s in raw_sources.items()}
    raw_stages = values.pop("stages", None)
    if not isinstance(raw_stages, list) or not raw_stages:
        fail("stages", "must be a list of at least one stage")
    stages = [_stage(i, s or {}, sources) for i, s in enumerate(raw_stages)]
    for i, stage in enumerate(stages):
        if len({sources[name].format for name in stage.mixture}) > 1:
            fail(f"stages.{i}.mixture", "mixes chat and text sources; a stage packs either whole conversations "
                                        "or documents")
    if tokenizer.kind == "bytes":
        for name, source in sources.items():
            if source.template is not None:
                fail(f"sources.{name}.template", "a chat template renders text that needs tokenizer.kind hf")
    names = [s.name for s in stages]
    for i, name in enumerate(names):
        if name in names[:i]:
            fail(f"stages.{i}.name", f"stage names must be unique; {name!r} repeats")
    cfg = DataConfig(tokenizer=tokenizer, sources=sources, stages=stages, **values)
    cfg.seed = _int("seed", cfg.seed, 0)
    if cfg.seed >= 2**31:
        fail("seed", f"must be < 2**31; got {cfg.seed}")
    boolean("shuffle", cfg.shuffle)
    choice("on_error", cfg.on_error, ON_ERROR)
    cfg.num_workers = _int("num_workers", cfg.num_workers, 0)
    cfg.worker_buffer_size = _int("worker_buffer_size", cfg.worker_buffer_size)
    cfg.read_threads = _int("read_threads", cfg.read_threads, 0)
    cfg.read_buffer_size = _int("read_buffer_size", cfg.read_buffer_size)
    return cfg


def load(source: str = "default", overrides=()) -> DataConfig:
    """Load a data config from a preset name (``default``, ``glm5``) or a YAML file, then apply overrides."""
    values = read_yaml_mapping(source, "data", "data")
    values = values.get("data", values)
    return from_dict(apply_overrides(values, overrides))
