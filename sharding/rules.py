"""Logical-axis rules: how the model's logical dimension names map to mesh axes."""

from __future__ import annotations

import importlib.resources
import math

import yaml
from jax.sharding import Mesh, PartitionSpec

from glm5_jax.errors import ConfigError
from glm5_jax.sharding.mesh import AXES

Rules = dict[str, tuple[str, ...]]


def default_rules() -> Rules:
    """The shipped rules (`configs/layouts/rules.yaml`)."""
    text = (importlib.resources.files("glm5_jax.configs") / "layouts" / "rules.yaml").read_text()
    return normalize(yaml.safe_load(text), "rules")


def normalize(rules: dict, key: str = "rules") -> Rules:
    """Check a rules mapping and turn every value into a tuple of mesh axis names."""
    if not isinstance(rules, dict):
        raise ConfigError(f"{key}: must map logical axis names to mesh axes")
    out = {}
    for name, value in rules.items():
        axes = () if value is None else (value,) if isinstance(value, str) else value
        if not isinstance(axes, (list, tuple)) or any(a not in AXES for a in axes):
            raise ConfigError(f"{key}.{name}: must be null, a mesh axis or a list of them ({', '.join(AXES)}); "
                              f"got {value!r}")
        out[name] = tuple(axes)
    return out


def partition_spec(axes, rules: Rules, mesh: Mesh, shape=None) -> PartitionSpec:
    """The PartitionSpec for an array whose dimensions carry logical names `axes` (None = unnamed).

    Mesh axes of size 1 are left out; a mesh axis already used by an earlier dimension is skipped; with a
    `shape`, trailing mesh axes are dropped from a dimension until their product divides its size.
    """
    used: set[str] = set()
    spec = []
    for i, name in enumerate(axes):
        if name is not None and name not in rules:
            raise ConfigError(f"rules: no rule for logical axis {name!r}; add one (null to replicate)")
        chosen = [a for a in rules.get(name, ()) if mesh.shape[a] > 1 and a not in used]
        if shape is not None:
            while chosen and shape[i] % math.prod(mesh.shape[a] for a in chosen):
                chosen.pop()
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)

