"""The GLM-5 training losses: next-token LM loss, MTP, sequence-level balance, z-loss and the DSA indexer
KL; the aux-loss-free router bias update; and the trainable-parameter mask for DSA warm-up.

docs/losses.md gives every formula, default and schedule knob.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from glm5_jax.errors import ConfigError
from glm5_jax.model.blocks import map_blocks
from glm5_jax.model.mla import DSA_MODES
from glm5_jax.values import check_keys, is_number


@dataclasses.dataclass
class LossConfig:
    z_loss: float = 0.0  # weight of mean(logsumexp(logits) ** 2) over scored tokens (main head)
    mtp_weight: float = 0.3  # weight of the MTP loss (mean over cfg.mtp_depths depths); 0 skips MTP
    balance_weight: float = 1e-4  # sequence-level balance loss (DeepSeek-V3), MoE layers incl. MTP's
    bias_update_rate: float = 0.001  # aux-loss-free router bias step (update_router_bias), not a loss
    dsa: str = "sparse"  # "sparse" | "dense" (no indexer) | "warmup" | "sparse_adapt" (DSA training stage)
    indexer_loss_weight: float = 1.0  # weight of the indexer KL (warmup, sparse_adapt)
    # RL objectives (glm5_jax.rl.objectives; docs/post-training.md, "RL objectives")
    clip_low: float = 0.2  # PPO clip / DIS band below 1 (0..1)
    clip_high: float = 0.28  # PPO clip / DIS band above 1
    icepop_beta: float = 2.0  # IcePop band [1 / beta, beta] of rho = pi_old_train / pi_rollout (> 1)
    kl_weight: float = 0.0  # weight of the k3 KL to a reference policy; 0: off
    temperature: float = 1.0  # the policy is softmax(logits / temperature), the sampling distribution (> 0)

    def validate(self, prefix: str = "") -> LossConfig:
        """Raise :class:`ConfigError` (one line naming the key) for the first invalid value; return self."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "dsa":
                if value not in DSA_MODES:
                    raise ConfigError(f"{prefix}dsa: must be one of {', '.join(DSA_MODES)}; got {value!r}")
            elif not is_number(value) or value < 0:
                raise ConfigError(f"{prefix}{f.name}: must be a finite number >= 0; got {value!r}")
            elif f.name in _BOUNDS and not _BOUNDS[f.name][1](value):
                raise ConfigError(f"{prefix}{f.name}: must be a finite number {_BOUNDS[f.name][0]}; got {value!r}")
        return self


_BOUNDS = {"clip_low": ("<= 1", lambda v: v <= 1), "icepop_beta": ("> 1", lambda v: v > 1),
           "temperature": ("> 0", lambda v: v > 0)}  # beyond >= 0
_LOSS_FIELDS = [f.name for f in dataclasses.fields(LossConfig)]


def loss_config_from_dict(values: dict | None, prefix: str = "") -> LossConfig:
    """A validated LossConfig from a plain dict (missing keys keep their defaults; unknown keys are errors).

    `prefix` (e.g. "loss.") is put before key names in error messages.
    """
    values = dict(values or {})
    check_keys(LossConfig, values, prefix, "loss config")
    values = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in values.items()}
    return LossConfig(**values).validate(prefix)


TOKEN_FIELDS = {"input_ids": jnp.int32, "targets": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32}


def inert(batch: dict, used) -> dict:
    """`batch` with nothing scored where `used` (broadcast against [..., L]) is false: no targets, padding
    segments (the microbatches past a step's count)."""
    return {**batch, "targets": jnp.where(used, batch["targets"], -1),
            "segment_ids": jnp.where(used, batch["segment_ids"], 0)}


def _is_static_zero(x) -> bool:
    return isinstance(x, (numbers.Real,)) and not isinstance(x, bool) and float(x) == 0.0


def _head_terms(model, hidden, targets, mask):
    """Per head: (summed cross-entropy, summed logsumexp ** 2, count) over `mask` [B, L, heads] of the logits
    of `hidden` [B, L, heads, D] (the main head and the MTP depths side by side: the output head is gathered,
    and its gradient summed, once for all) against `targets` [B, L, heads]. One block of positions at a time,
    `model.cfg.logits_block` logits rows in all, each block rematerialised: the backward recomputes a block's
    logits, so no [L, vocab] array is ever held."""
    def block(h, t):
        logits = model.head(h)  # [B, block, heads, V] float32
        logz = jax.nn.logsumexp(logits, axis=-1)
        return logz, jnp.take_along_axis(logits, jnp.maximum(t, 0)[..., None], axis=-1)[..., 0]

    positions = max(1, model.cfg.logits_block // hidden.shape[2])
    logz, picked = map_blocks(block, positions, hidden, targets, remat=True)
    total = lambda x: jnp.sum(jnp.where(mask, x, 0.0), axis=(0, 1))
    return total(logz - picked), total(logz * logz), jnp.sum(mask, axis=(0, 1))


def mtp_targets(targets, segment_ids, depths: int):
    """Targets [depths, B, L] of the MTP depths: depth k (1-based) at t predicts token t + k + 1, which is
    `targets[t + k]`; -1 (not scored) where t + k is past the row end, in another document, or unscored."""
    L = targets.shape[1]
    t = jnp.pad(targets, ((0, 0), (0, depths)), constant_values=-1)
    s = jnp.pad(segment_ids, ((0, 0), (0, depths)), constant_values=-1)
    return jnp.stack([jnp.where(s[:, k:k + L] == segment_ids, t[:, k:k + L], -1) for k in range(1, depths + 1)])


def normalizers(batch, depths: int) -> dict:
    """The denominators of every loss term, from a whole optimizer step's batch (leaves [..., L]: a step's
    microbatches may stack on leading axes). Terms computed against these and summed over microbatches
    equal the terms of the whole batch at once."""
    flat = {k: batch[k].reshape(-1, batch[k].shape[-1]) for k in ("targets", "segment_ids")}
    targets, segments = flat["targets"], flat["segment_ids"]
    real = segments > 0
    norms = {"tokens": jnp.maximum(jnp.sum(targets >= 0), 1), "rows": jnp.maximum(jnp.sum(jnp.any(real, axis=1)), 1),
             "real": jnp.maximum(jnp.sum(real), 1)}
    if depths:
        norms["mtp"] = jnp.maximum(jnp.sum(mtp_targets(targets, segments, depths) >= 0, axis=(1, 2)), 1)
    return norms


def mtp_depths(cfg, loss_cfg: LossConfig, mtp_weight=None) -> int:
    """MTP depths the loss runs: the config's, unless the model has no MTP layer or the weight is a static 0."""
    w = loss_cfg.mtp_weight if mtp_weight is None else mtp_weight
    return cfg.mtp_depths if cfg.has_mtp and not _is_static_zero(w) else 0


def total_loss(params, buffers, graphdef, batch, loss_cfg: LossConfig, mtp_weight=None, norms=None):
    """The training objective and its parts.

    batch: `input_ids`, `targets`, `positions`, `segment_ids` [B, L] int32; a target < 0 is not scored;
    segment id 0 marks padding (no balance or indexer terms). mtp_weight: overrides loss_cfg.mtp_weight,
    may be a traced scalar (a schedule without recompiling); MTP runs unless the weight is a static 0.
    norms: the denominators (`normalizers`) of the whole optimizer step when `batch` is one of its
    microbatches; default: this batch's own.

    loss = lm + w_mtp * mtp + balance_weight * balance + z_loss * z (+ indexer_loss_weight * indexer_kl in
    "sparse_adapt"); in "warmup" loss = indexer_loss_weight * indexer_kl only (the rest is reported).
    Every term is a sum over tokens (rows, queries) divided by its normaliser, so the loss of a batch is the
    sum of its microbatches' losses.
    aux = {"tokens", "expert_load": [main MoE layers (+1: the MTP layer's, summed over depths, when MTP
    ran), E] int32, "metrics": {"lm", "mtp", "balance", "z", "indexer_kl"} float32 scalars}.
    """
    model = nnx.merge(graphdef, params, buffers)
    w_mtp = loss_cfg.mtp_weight if mtp_weight is None else mtp_weight
    depths = mtp_depths(model.cfg, loss_cfg, mtp_weight)
    norms = normalizers(batch, depths) if norms is None else norms
    ids, targets, segments = batch["input_ids"], batch["targets"], batch["segment_ids"]
    out = model(ids, batch["positions"], segments, mtp_depths=depths, dsa_mode=loss_cfg.dsa, logits=False)
    f32 = lambda x: jnp.asarray(x, jnp.float32)

    hidden, all_targets = out.hidden[None], targets[None]  # [heads, B, L, D]: the main head, then MTP's
    if depths:
        hidden = jnp.concatenate([hidden, out.mtp_hidden])
        all_targets = jnp.concatenate([all_targets, mtp_targets(targets, segments, depths)])
    all_targets = jnp.moveaxis(all_targets, 0, 2)
    ce, zz, counts = _head_terms(model, jnp.moveaxis(hidden, 0, 2), all_targets, all_targets >= 0)
    lm, z, count = ce[0] / norms["tokens"], zz[0] / norms["tokens"], counts[0]
    stats = [out.stats] + ([out.mtp_stats] if depths else [])

    mtp = jnp.float32(0.0)
    if depths:
        mtp = jnp.sum(ce[1:] / norms["mtp"]) / depths

    balances = [s.balance for s in stats if s.balance is not None]
    balance = jnp.float32(0.0)
    if balances:  # mean over sequences (rows) and MoE layer applications (MTP: one per depth)
        balance = sum(jnp.sum(b) for b in balances) / (norms["rows"] * sum(b.shape[0] for b in balances))
    kls = [s.indexer_kl for s in stats if s.indexer_kl is not None]
    kl = jnp.float32(0.0)
    if kls:  # mean over real queries and indexer-layer applications (MTP: one per depth)
        kl = sum(jnp.sum(k) for k in kls) / (norms["real"] * sum(k.shape[0] for k in kls))

    if loss_cfg.dsa == "warmup":
        loss = loss_cfg.indexer_loss_weight * kl
    else:
        loss = lm + loss_cfg.balance_weight * balance + loss_cfg.z_loss * z
        if depths:
            loss = loss + w_mtp * mtp
        if loss_cfg.dsa == "sparse_adapt":
            loss = loss + loss_cfg.indexer_loss_weight * kl

    loads = [out.expert_load] if out.expert_load is not None else []
    if depths and out.mtp_stats.load is not None:
        loads.append(out.mtp_stats.load.sum(axis=0, keepdims=True))
    expert_load = jnp.concatenate(loads) if loads else None
    metrics = {"lm": f32(lm), "mtp": f32(mtp), "balance": f32(balance), "z": f32(z), "indexer_kl": f32(kl)}
    return f32(loss), {"tokens": count, "expert_load": expert_load, "metrics": metrics}


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _keys(path) -> tuple:
    return tuple(getattr(k, "key", getattr(k, "name", getattr(k, "idx", None))) for k in path)


def _router_bias_paths(buffers) -> list[tuple]:
    """Paths of the e_score_correction_bias buffers in model order: main groups, then MTP's layer."""
    paths = [_keys(p) for p, v in jax.tree_util.tree_flatten_with_path(buffers, is_leaf=_is_variable)[0]
             if _is_variable(v) and _keys(p)[-1] == "e_score_correction_bias"]
    main = sorted((p for p in paths if p[0] == "layers"), key=lambda p: p[1])
    return main + [p for p in paths if p[0] != "layers"]


def update_router_bias(buffers, expert_load, rate):
    """Aux-loss-free balancing: bias_i += rate * sign(mean_j load_j - load_i), per MoE layer.

    buffers: the model's non-parameter state (holds every `e_score_correction_bias`); expert_load: the
    `total_loss` aux `expert_load` [rows, E], main MoE layers in model order, then the MTP layer's row
    (its load summed over depths) when MTP ran; without that row the MTP bias is left as it is. rate may
    be traced. Pure and jit-friendly; returns the new `buffers`.
    """
    paths = _router_bias_paths(buffers)
    main = [p for p in paths if p[0] == "layers"]
    rows = {}
    start = 0
    for p in main:
        v = _get(buffers, p)
        n = v.shape[0]
        rows[p] = (start, n)
        start += n
    extra = [p for p in paths if p[0] != "layers"]
    if expert_load.shape[0] not in (start, start + len(extra)):
        raise ValueError(f"expert_load has {expert_load.shape[0]} rows; the model has {start} MoE layers "
                         f"(+{len(extra)} MTP)")
    if expert_load.shape[0] > start:
        for i, p in enumerate(extra):
            rows[p] = (start + i, None)

    def step(load):
        load = load.astype(jnp.float32)
        return rate * jnp.sign(load.mean(axis=-1, keepdims=True) - load)

    def update(path, v):
        key = _keys(path)
        if not _is_variable(v) or key not in rows:
            return v
        s, n = rows[key]
        delta = step(expert_load[s:s + n]) if n is not None else step(expert_load[s])
        return v.replace((v[...] + delta).astype(v[...].dtype))

    return jax.tree_util.tree_map_with_path(update, buffers, is_leaf=_is_variable)


def _get(state, path):
    for k in path:
        state = state[k]
    return state


def is_indexer_path(path) -> bool:
    keys = _keys(path)
    return any(a == "self_attn" and b == "indexer" for a, b in itertools.pairwise(keys))


def trainable_mask(params, which: str):
    """A pytree of bools with the structure of `params` (one per parameter): True where it trains.

    which: "all"; "indexer" (every `...self_attn.indexer.*` parameter, MTP's included: DSA warm-up); or
    "no_indexer" (every parameter but those: the indexer neither trained nor decayed, as in dense-attention
    stages and RL). Use with `optax.masked(tx, mask)` or multiply updates by it.
    """
    if which not in ("all", "indexer", "no_indexer"):  # (a recipe's `trainable` is checked where it is read)
        raise ValueError(f"trainable: must be one of all, indexer, no_indexer; got {which!r}")
    def leaf(path, v):
        keep = which == "all" or is_indexer_path(path) == (which == "indexer")
        return v.replace(keep) if _is_variable(v) else keep

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_variable)
