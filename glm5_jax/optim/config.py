"""Typed optimizer configuration, loaded from a plain dict and validated before anything compiles.

Defaults are GLM-5's recipe (the GLM-5 report, arXiv 2602.15763; docs/optimizer.md): Muon-Split for matrices, AdamW for the rest, both with
weight decay 0.1. Every problem is one :class:`~glm5_jax.errors.ConfigError` line naming the key.
"""

from __future__ import annotations

import dataclasses

from glm5_jax.values import boolean, build, choice, fail, is_int, is_number

SCHEDULES = ("cosine", "linear", "constant", "wsd")
MATRIX_OPTIMIZERS = ("muon", "adamw")
WSD_DECAYS = ("linear", "cosine")
MU_DTYPES = (None, "float32", "bfloat16")


@dataclasses.dataclass
class OptimizerConfig:
    # --- which optimizer runs the matrices ---
    matrix_optimizer: str = "muon"  # muon (AdamW for the rest) or adamw (everything AdamW: a baseline)
    # --- learning rate schedule (in optimizer steps; one schedule drives Muon and AdamW) ---
    learning_rate: float = 2e-4  # peak value, reached after warmup_steps
    schedule: str = "cosine"  # cosine | linear | constant | wsd
    warmup_steps: int = 0  # linear ramp 0 -> learning_rate
    total_steps: int = 1000  # schedule length, warm-up included
    end_learning_rate: float = 0.0  # value at total_steps (cosine, linear, wsd)
    decay_steps: int = 0  # wsd only: length of the final decay phase
    wsd_decay: str = "linear"  # wsd only: shape of the final decay
    # --- Muon ---
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    ns_coeffs: tuple = (3.4445, -4.7750, 2.0315)  # quintic (a, b, c), or one triple per step
    consistent_rms: float | None = 0.2  # update RMS 0.2 * sqrt(max(fan_in, fan_out)) (Moonlight); None: optax width scaling
    weight_decay: float = 0.1  # decoupled, multiplied by the learning rate (Muon and AdamW)
    mu_dtype: str | None = None  # momentum dtype (None: the parameter's)
    # --- Muon-Split switches ---
    split_heads: bool = True  # orthogonalise W^UQ, W^UK, W^UV per head (off: plain Muon, for ablations)
    split_qk_rope: bool = False  # per head, q's nope and rope columns apart (default: together)
    split_o_proj: bool = False  # o_proj per head too (default: the whole matrix)
    # --- AdamW (embeddings, lm_head, norms, biases) ---
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    adam_weight_decay: float | None = None  # None: weight_decay
    adam_nesterov: bool = False  # NAdamW, as optax.contrib.muon runs for its non-matrix leaves

    def __post_init__(self):
        if isinstance(self.ns_coeffs, list):
            self.ns_coeffs = tuple(tuple(c) if isinstance(c, list) else c for c in self.ns_coeffs)

    def validate(self) -> OptimizerConfig:
        _validate(self)
        return self

    @property
    def decoupled_adam_weight_decay(self) -> float:
        return self.weight_decay if self.adam_weight_decay is None else self.adam_weight_decay


def _validate(c: OptimizerConfig):
    for key, allowed in (("matrix_optimizer", MATRIX_OPTIMIZERS), ("schedule", SCHEDULES),
                         ("wsd_decay", WSD_DECAYS), ("mu_dtype", MU_DTYPES)):
        choice(f"optimizer.{key}", getattr(c, key), allowed)
    for key in ("nesterov", "split_heads", "split_qk_rope", "split_o_proj", "adam_nesterov"):
        boolean(f"optimizer.{key}", getattr(c, key))
    for key in ("learning_rate", "end_learning_rate", "weight_decay", "adam_eps"):
        if not is_number(getattr(c, key)) or getattr(c, key) < 0:
            fail(f"optimizer.{key}", f"must be a number >= 0; got {getattr(c, key)!r}")
    if c.adam_weight_decay is not None and not (is_number(c.adam_weight_decay) and c.adam_weight_decay >= 0):
        fail("optimizer.adam_weight_decay", f"must be null or a number >= 0; got {c.adam_weight_decay!r}")
    if c.consistent_rms is not None and not (is_number(c.consistent_rms) and c.consistent_rms > 0):
        fail("optimizer.consistent_rms", f"must be null or a number > 0; got {c.consistent_rms!r}")
    for key in ("momentum", "adam_b1", "adam_b2"):
        if not is_number(getattr(c, key)) or not 0 <= getattr(c, key) < 1:
            fail(f"optimizer.{key}", f"must be in [0, 1); got {getattr(c, key)!r}")
    for key in ("warmup_steps", "decay_steps"):
        if not is_int(getattr(c, key)) or getattr(c, key) < 0:
            fail(f"optimizer.{key}", f"must be an integer >= 0; got {getattr(c, key)!r}")
    for key in ("total_steps", "ns_steps"):
        if not is_int(getattr(c, key)) or getattr(c, key) < 1:
            fail(f"optimizer.{key}", f"must be a positive integer; got {getattr(c, key)!r}")
    if c.warmup_steps + (c.decay_steps if c.schedule == "wsd" else 0) > c.total_steps:
        fail("optimizer.warmup_steps", f"warm-up{' + decay_steps' if c.schedule == 'wsd' else ''} must fit in "
              f"total_steps ({c.total_steps}); got {c.warmup_steps}")
    if c.schedule != "constant" and c.end_learning_rate > c.learning_rate:
        fail("optimizer.end_learning_rate", f"must be <= learning_rate ({c.learning_rate}); got {c.end_learning_rate}")
    coeffs = c.ns_coeffs
    triple = lambda t: isinstance(t, tuple) and len(t) == 3 and all(map(is_number, t))
    if not (triple(coeffs) or (isinstance(coeffs, tuple) and len(coeffs) == c.ns_steps and all(map(triple, coeffs)))):
        fail("optimizer.ns_coeffs", f"must be 3 numbers (a, b, c) or ns_steps ({c.ns_steps}) such triples; got {coeffs!r}")


def from_dict(values: dict | None = None) -> OptimizerConfig:
    """Build and validate an optimizer config from a plain dict (e.g. a YAML `optimizer:` section)."""
    return build(OptimizerConfig, dict(values or {}), "optimizer.", "optimizer config").validate()
