"""Plain config values, one mechanism for every config (model, layout, data, recipe, optimizer, losses):
YAML files and shipped presets read as plain data, `key=value` overrides applied to them, dataclasses built
from them with a did-you-mean for unknown keys, and the checks their validators share. Every problem is one
`ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import json
import math
import os
import re

import yaml

from glm5_jax.errors import ConfigError


def fail(key: str, message: str):
    raise ConfigError(f"{key}: {message}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(key: str, v, allow_none: bool = False):
    if v is None and allow_none:
        return
    if not is_int(v) or v < 1:
        fail(key, f"must be a positive integer{' or null' if allow_none else ''}; got {v!r}")


def directory(key: str, v, allow_none: bool = False):
    """A directory path the run creates or reuses: a non-empty string, not the path of an existing file."""
    if v is None and allow_none:
        return
    if not isinstance(v, str) or not v:
        fail(key, f"must be a directory path{' or null' if allow_none else ''}; got {v!r}")
    if os.path.exists(v) and not os.path.isdir(v):
        fail(key, f"{v} is a file, not a directory")


def boolean(key: str, v):
    if not isinstance(v, bool):
        fail(key, f"must be true or false; got {v!r}")


def choice(key: str, value, allowed):
    if value not in allowed:
        fail(key, f"must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return value


def unknown_key(key: str, known, what: str) -> ConfigError:
    """The error for a key that is not a field: the closest known one, else the allowed ones."""
    known = [str(k) for k in known]
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f"; allowed: {', '.join(known)}"
    return ConfigError(f"{key}: unknown {what} key{hint}")


def check_keys(cls, values, key: str = "", what: str = "config", skip=()):
    """Raise unless `values` is a mapping whose keys are fields of dataclass `cls` (less `skip`).

    key: the dotted prefix of these values in the whole config ("checkpoint.", "stages.0."), for messages;
    what: the kind of config in messages ("recipe", "data config").
    """
    if not isinstance(values, dict):
        fail(key.rstrip(".") or what, f"must be a mapping; got {values!r}")
    known = [f.name for f in dataclasses.fields(cls) if f.name not in skip]
    for k in values:
        if k not in known:
            raise unknown_key(f"{key}{k}", [f"{key}{n}" for n in known], what)


def build(cls, values, key: str = "", what: str = "config", nested=None, skip=()):
    """`cls(**values)` for a dataclass, after `check_keys`; `nested` maps a field name to a function that
    builds that field from its raw value (a nested dataclass, a list of them)."""
    check_keys(cls, values, key, what, skip)
    kwargs = dict(values)
    for name, make in (nested or {}).items():
        if name in kwargs:
            kwargs[name] = make(kwargs[name])
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a list where a mapping belongs
        raise ConfigError(f"{key.rstrip('.') or what}: {e}") from None


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


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{key}: {part!r} is not an index of a list of {len(node)} (0..{len(node) - 1})")
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
    for key, value in _parsed(overrides):
        *parents, leaf = key.split(".")
        node = values
        for p in parents:
            node = node[_list_index(node, p, key)] if isinstance(node, list) else node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"{key}: {p} is not a mapping")
        _set(node, leaf, value, key)
    return values


def dotted_values(overrides) -> dict:
    """{dotted key: value} of `key=value` strings (or of a mapping): overrides as a recipe section holds them."""
    return dict(_parsed(overrides))


def _parsed(overrides):
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
    """The JSON object (a mapping) of a config file such as an HF config.json."""
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: must hold a JSON object of keys and values; got a {type(values).__name__}")
    return values


def key_values(parser, flag: str, help: str):
    """A repeatable `--flag KEY=VALUE` command-line option, collected into a list for `apply_overrides`."""
    parser.add_argument(flag, action="append", default=[], metavar="KEY=VALUE", help=help)
