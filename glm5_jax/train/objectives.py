"""Objectives: what the one train step optimises, as a value the step takes.

An objective says which batch fields it reads (name -> dtype; every field is [microbatch, row, token]),
how the microbatches past a step's count are made inert, the denominators of its loss terms over the whole
step's batch (so the sum of microbatch losses equals the loss of all rows at once: accumulation equals one
big batch), the loss of one microbatch with its metrics, the metrics it derives from the step's sums, and
the rule applied to the model's buffers after the update (the aux-loss-free router bias). The step
(`glm5_jax.train.step`) does the rest: accumulation, gradients, the optimizer update, the non-finite guard.

Objectives by name (`stages.N.objective` in a recipe, docs/training.md and docs/post-training.md):

- `pretrain`: the GLM-5 pre-training losses (`glm5_jax.train.losses.total_loss`: LM, MTP, sequence balance,
  z-loss, the DSA indexer KL) over every target the data marks.
- `sft`: the same terms over the tokens a chat stage scores: the data marks every other target -1 (the
  in-turn loss mask), so `lm` is the assistant-token loss; it adds `scored_share`, the fraction of the
  batch's real tokens that are scored.

- `grpo`, `dis`, `distill`: the RL objectives over rollouts (`glm5_jax.rl.objectives`; docs/post-training.md,
  "RL objectives").

A new objective is a class with this API registered in `OBJECTIVES`.
"""

from __future__ import annotations

import jax.numpy as jnp

from glm5_jax.checkpoint.naming import flatten, to_state
from glm5_jax.errors import ConfigError
from glm5_jax.model import layer_groups
from glm5_jax.rl.objectives import RL_OBJECTIVES
from glm5_jax.train import losses

TOKEN_FIELDS = losses.TOKEN_FIELDS


class LanguageModel:
    """`pretrain`: the GLM-5 training losses over a packed token batch (docs/losses.md)."""

    name = "pretrain"
    data_format = None  # the data sources it needs (data/config.py FORMATS); None: any
    fields = TOKEN_FIELDS
    metric_names = ("lm", "mtp", "balance", "z", "indexer_kl")  # the loss's parts, as `loss` returns them
    step_metric_names = ("expert_load_max_over_mean", "dropped")  # from the step's summed expert loads

    def __init__(self, model_cfg, loss_cfg: losses.LossConfig):
        self.model_cfg, self.loss_cfg = model_cfg, loss_cfg
        self.depths = losses.mtp_depths(model_cfg, loss_cfg)
        self.moe_layers = sum(g.count for g in layer_groups(model_cfg) if g.moe)

    def unused(self, batch: dict, used) -> dict:
        """`batch` with nothing scored where `used` [microbatch, 1, 1] is false (no targets, padding segments)."""
        return losses.inert(batch, used)

    def normalizers(self, batch: dict) -> dict:
        return losses.normalizers(batch, self.depths)

    def loss(self, params: dict, buffers: dict, abstract, batch: dict, norms: dict):
        """(loss, aux) of one microbatch against the step's `norms`; params / buffers: {dotted name: array};
        aux = {"tokens": scored tokens, "metrics": {name: float32}, "carry": what `after_update` and
        `step_metrics` read, summed over microbatches}."""
        graphdef, tmpl_params, tmpl_buffers = abstract
        loss, aux = losses.total_loss(to_state(params, tmpl_params), to_state(buffers, tmpl_buffers), graphdef,
                                      batch, self.loss_cfg, norms=norms)
        return loss, {"tokens": aux["tokens"], "metrics": aux["metrics"], "carry": {"expert_load": aux["expert_load"]}}

    def after_update(self, buffers: dict, tmpl_buffers, carry: dict, rate) -> dict:
        """The buffers after a step: the router bias moved against the step's expert loads (when the loss config
        updates it and the model routes)."""
        load = carry["expert_load"]
        if self.loss_cfg.bias_update_rate <= 0 or load is None:
            return buffers
        return flatten(losses.update_router_bias(to_state(buffers, tmpl_buffers), load, rate))

    def step_metrics(self, carry: dict, count, rows: int, seq_len: int) -> dict:
        load = carry["expert_load"]
        if load is None:
            return {}
        load = load.astype(jnp.float32)
        mean = jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
        copies = count * rows * seq_len * self.model_cfg.num_experts_per_tok * self.moe_layers
        return {"expert_load_max_over_mean": jnp.mean(jnp.max(load, axis=-1) / mean),
                "dropped": 1.0 - jnp.sum(load[:self.moe_layers]) / copies}  # (MTP's row, if any, is last)


class SupervisedFineTuning(LanguageModel):
    """`sft`: the language-model terms over the tokens a chat data stage scores (its in-turn loss mask)."""

    name = "sft"
    data_format = "chat"  # conversations, whose loss masks score the assistant's tokens
    metric_names = LanguageModel.metric_names + ("scored_share",)

    def __init__(self, model_cfg, loss_cfg: losses.LossConfig):
        if loss_cfg.dsa == "warmup":
            raise ConfigError("losses.dsa: warmup trains only the indexer; objective sft trains the model "
                              "(use sparse or sparse_adapt)")
        super().__init__(model_cfg, loss_cfg)

    def loss(self, params, buffers, abstract, batch, norms):
        loss, aux = super().loss(params, buffers, abstract, batch, norms)
        aux["metrics"]["scored_share"] = jnp.float32(aux["tokens"]) / norms["real"]
        return loss, aux


OBJECTIVES = {cls.name: cls for cls in (LanguageModel, SupervisedFineTuning, *RL_OBJECTIVES)}


def make(name: str, model_cfg, loss_cfg: losses.LossConfig, key: str = "objective"):
    """The objective `name` for a model and loss config; an unknown name is one `ConfigError` line."""
    if name not in OBJECTIVES:
        raise ConfigError(f"{key}: must be one of {', '.join(OBJECTIVES)}; got {name!r}")
    try:
        return OBJECTIVES[name](model_cfg, loss_cfg)
    except ConfigError as e:
        raise ConfigError(f"{key}: {name}: {e}") from None
