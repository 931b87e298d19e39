"""Parallel layouts: a mesh shape, logical-axis rules and the expert / pipeline settings, loaded from YAML."""

from __future__ import annotations

import dataclasses

from glm5_jax.errors import ConfigError
from glm5_jax.sharding import rules as rules_lib
from glm5_jax.values import apply_overrides, build, read_yaml_mapping

DISPATCHES = ("auto", "capacity", "ragged")


@dataclasses.dataclass
class ParallelConfig:
    """How one training job is laid out on its devices (see docs/parallelism.md)."""

    mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1})  # axis sizes within a slice / node
    dcn: dict = dataclasses.field(default_factory=dict)  # axis factors across slices / nodes (multi-slice)
    rules: dict = dataclasses.field(default_factory=dict)  # overrides of configs/layouts/rules.yaml
    # Expert parallelism: "ragged" moves exactly the routed tokens (ragged_all_to_all; GPU/TPU),
    # "capacity" moves fixed-size padded buffers (all_to_all; runs everywhere), "auto" picks by backend.
    expert_dispatch: str = "auto"
    capacity_factor: float | None = None  # None: dropless; else per-shard buffer = factor * even share
    microbatches: int = 1  # pipeline microbatches per step (>= stages)
    pipeline_repeats: int = 1  # circular pipeline: each stage holds this many non-adjacent layer chunks

    def resolved_rules(self) -> rules_lib.Rules:
        return {**rules_lib.default_rules(), **rules_lib.normalize(self.rules)}

    def validate(self) -> ParallelConfig:
        for key in ("mesh", "dcn"):
            if not isinstance(getattr(self, key), dict):
                raise ConfigError(f"{key}: must map mesh axis names to sizes")
        self.resolved_rules()
        if self.expert_dispatch not in DISPATCHES:
            raise ConfigError(f"expert_dispatch: must be one of {', '.join(DISPATCHES)}; got {self.expert_dispatch!r}")
        if self.capacity_factor is not None and not (isinstance(self.capacity_factor, (int, float))
                                                     and self.capacity_factor > 0):
            raise ConfigError(f"capacity_factor: must be a positive number or null (dropless); "
                              f"got {self.capacity_factor!r}")
        for key in ("microbatches", "pipeline_repeats"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{key}: must be a positive integer; got {value!r}")
        return self


def layout_from_dict(values: dict) -> ParallelConfig:
    return build(ParallelConfig, values, "", "layout").validate()


def load_layout(source: str | None, overrides=()) -> ParallelConfig:
    """A layout from a preset name (`configs/layouts/NAME.yaml`) or YAML file, then `key=value` overrides.

    `source=None` starts from the default (all devices on `data`).
    """
    values = read_yaml_mapping(source, "layouts", "layout", skip=("rules",)) if source else {}
    return layout_from_dict(apply_overrides(values, overrides))
