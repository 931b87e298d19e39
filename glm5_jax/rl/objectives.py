"""The RL objectives of the train step (`glm5_jax.train.objectives` registers them): `grpo` (GRPO with IcePop,
reasoning RL), `dis` (direct double-sided importance sampling, agentic RL) and `distill` (on-policy
distillation). docs/post-training.md, "RL objectives", gives every formula.

One batch row is one sample (prompt and response); `targets[t] = -1` wherever token t + 1 is not trained. The
policy's log-probs come from `glm5_jax.rl.logprobs.state_logprobs`, the function the rollout engine scores its
samples with. `policy_terms` is the per-token part, pure and testable without a model: the loss summed over
samples, each sample's tokens averaged, and the metrics' numerators; `loss` divides them by the whole step's
`normalizers`, so the losses of a step's microbatches add up to the loss of all its rows at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from glm5_jax.checkpoint.naming import to_state
from glm5_jax.errors import ConfigError
from glm5_jax.rl.logprobs import state_logprobs
from glm5_jax.train import losses
from glm5_jax.values import positive_int

KINDS = ("grpo", "dis", "distill")
# The float32 batch fields each kind reads (0 where not scored), besides losses.TOKEN_FIELDS.
KIND_FIELDS = {"grpo": ("old_logp", "rollout_logp", "advantages"), "dis": ("rollout_logp", "advantages"),
               "distill": ("rollout_logp", "teacher_logp")}
MAX_LOG_RATIO = 20.0  # GRPO's log r and the KL's log ratio are clamped to +-20: exp never overflows to inf
# metric -> the step normaliser its numerator is divided by (None: a count, summed as it is)
DENOMINATORS = {"policy_loss": "samples", "kl": "samples", "clipped_share": "tokens",
                "icepop_masked_share": "tokens", "entropy": "tokens", "teacher_gap": "tokens",
                "response_tokens": "samples", "samples": None}


def normalizers(targets) -> dict:
    """{"samples": rows with at least one scored token, "tokens": scored tokens} of a whole step's `targets`
    [..., L] (each at least 1)."""
    scored = targets.reshape(-1, targets.shape[-1]) >= 0
    return {"samples": jnp.maximum(jnp.sum(jnp.any(scored, axis=-1)), 1), "tokens": jnp.maximum(jnp.sum(scored), 1)}


def policy_terms(kind: str, logp, fields: dict, cfg: losses.LossConfig):
    """(loss numerator, {metric: numerator}) of `logp` [..., L] (log pi_theta of the targets, float32) and the
    batch `fields` (`targets`, the kind's KIND_FIELDS, `entropy` from `token_logprobs`, `ref_logp` when
    `cfg.kl_weight` > 0). The loss numerator is sum_i (1 / |y_i|) sum_t (-term_it + kl_weight * k3_it) over
    the scored tokens t of each sample i; metrics divide by `DENOMINATORS`."""
    scored = fields["targets"] >= 0
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    size = jnp.sum(scored, axis=-1, keepdims=True)
    per_sample = lambda x: jnp.sum(jnp.where(scored, x, 0.0) / jnp.maximum(size, 1))  # sum_i mean_t
    count = lambda x: jnp.sum(scored & x)
    lo, hi = 1.0 - cfg.clip_low, 1.0 + cfg.clip_high
    out = {"entropy": jnp.sum(jnp.where(scored, fields["entropy"], 0.0)), "samples": jnp.sum(size > 0),
           "response_tokens": jnp.sum(scored)}
    if kind == "grpo":
        adv = fields["advantages"]
        r = jnp.exp(jnp.clip(logp - fields["old_logp"], -MAX_LOG_RATIO, MAX_LOG_RATIO))
        rho = jnp.exp(fields["old_logp"] - fields["rollout_logp"])
        inside = (rho >= 1.0 / cfg.icepop_beta) & (rho <= cfg.icepop_beta)
        term = jnp.where(inside, rho, 0.0) * jnp.minimum(r * adv, jnp.clip(r, lo, hi) * adv)
        out["clipped_share"] = count(((adv > 0) & (r > hi)) | ((adv < 0) & (r < lo)))
        out["icepop_masked_share"] = count(~inside)
    else:  # dis, distill: f(r) A log pi, f(r) a stop-gradient weight
        adv = fields["advantages"] if kind == "dis" else jax.lax.stop_gradient(fields["teacher_logp"] - logp)
        r = jnp.exp(jax.lax.stop_gradient(logp) - fields["rollout_logp"])
        inside = (r > lo) & (r < hi)
        term = jnp.where(inside, r, 0.0) * adv * logp
        out["clipped_share"] = count(~inside)
        if kind == "distill":
            out["teacher_gap"] = jnp.sum(jnp.where(scored, fields["teacher_logp"] - logp, 0.0))
    out["policy_loss"] = per_sample(-term)
    loss = out["policy_loss"]
    if cfg.kl_weight > 0:  # k3 estimator of KL(pi_theta || pi_ref)
        d = jnp.clip(fields["ref_logp"] - logp, -MAX_LOG_RATIO, MAX_LOG_RATIO)
        out["kl"] = per_sample(jnp.exp(d) - d - 1.0)
        loss = loss + cfg.kl_weight * out["kl"]
    return f32(loss), {k: f32(v) for k, v in out.items()}


class PolicyObjective:
    """An RL objective of the train step (the seam of `glm5_jax.train.objectives`); subclasses set `kind`, one
    of KINDS. Its `fields` and `metric_names` depend on the loss config (`ref_logp` and `kl` with the KL on)."""

    kind: str
    data_format = "prompts"  # prompts the loop rolls out
    step_metric_names = ()
    depths = 0

    def __init__(self, model_cfg, loss_cfg: losses.LossConfig):
        if loss_cfg.dsa != "sparse":
            raise ConfigError(f"losses.dsa: RL trains with the indexer frozen; objective {self.kind} needs sparse; "
                              f"got {loss_cfg.dsa}")
        self.model_cfg, self.loss_cfg = model_cfg, loss_cfg
        extra = KIND_FIELDS[self.kind] + (("ref_logp",) if loss_cfg.kl_weight > 0 else ())
        self.fields = {**losses.TOKEN_FIELDS, **{k: jnp.float32 for k in extra}}
        own = {"grpo": ("icepop_masked_share",), "dis": (), "distill": ("teacher_gap",)}[self.kind]
        kl = ("kl",) if loss_cfg.kl_weight > 0 else ()
        self.metric_names = ("policy_loss", *kl, "clipped_share", *own, "entropy", "response_tokens", "samples")

    def unused(self, batch: dict, used) -> dict:
        return losses.inert(batch, used)

    def normalizers(self, batch: dict) -> dict:
        return normalizers(batch["targets"])

    def loss(self, params: dict, buffers: dict, abstract, batch: dict, norms: dict):
        """(loss, aux) of one microbatch against the step's `norms`, as `LanguageModel.loss`."""
        graphdef, tmpl_params, tmpl_buffers = abstract
        logp, entropy = state_logprobs(to_state(params, tmpl_params), to_state(buffers, tmpl_buffers), graphdef,
                                       batch, self.loss_cfg.temperature)
        total, sums = policy_terms(self.kind, logp, {**batch, "entropy": entropy}, self.loss_cfg)
        metrics = {k: v if DENOMINATORS[k] is None else v / norms[DENOMINATORS[k]] for k, v in sums.items()}
        tokens = jnp.sum(batch["targets"] >= 0)
        return total / norms["samples"], {"tokens": tokens, "metrics": metrics, "carry": {}}

    def after_update(self, buffers: dict, tmpl_buffers, carry: dict, rate) -> dict:
        """Buffers unchanged: no router bias update in RL."""
        return buffers

    def step_metrics(self, carry: dict, count, rows: int, seq_len: int) -> dict:
        return {}


class GRPO(PolicyObjective):
    """`grpo`: GRPO with IcePop (reasoning RL)."""

    name = kind = "grpo"


class DirectIS(PolicyObjective):
    """`dis`: direct double-sided importance sampling (agentic RL)."""

    name = kind = "dis"


class Distill(PolicyObjective):
    """`distill`: on-policy distillation from a teacher's log-probs."""

    name = kind = "distill"


RL_OBJECTIVES = (GRPO, DirectIS, Distill)


def check_group_size(objective: str, group_size, key: str = "group_size"):
    """Raise the one-line ConfigError for a group size `objective` cannot train with: GRPO's and DIS's advantages
    compare a prompt's samples, so they need at least 2; distill trains one sample per prompt."""
    positive_int(key, group_size)
    if objective in ("grpo", "dis") and group_size < 2:
        raise ConfigError(f"{key}: objective {objective} compares the samples of a prompt's group (advantage "
                          f"R - mean R); needs at least 2; got {group_size}")


def rho_quantiles(old_logp, rollout_logp, targets, quantiles=(0.01, 0.5, 0.99)) -> dict:
    """{"rho_qNN": quantile} of rho = pi_old_train / pi_rollout over the scored tokens of a step's batch (host
    arrays): the training-inference mismatch, from the batch alone (rho does not depend on the update)."""
    scored = np.asarray(targets) >= 0
    if not scored.any():
        return {}
    rho = np.exp(np.asarray(old_logp, np.float64)[scored] - np.asarray(rollout_logp, np.float64)[scored])
    return {f"rho_q{round(q * 100):02d}": float(v) for q, v in zip(quantiles, np.quantile(rho, quantiles))}
