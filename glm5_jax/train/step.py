"""Sharded model state and the jitted train step (forward, loss, backward, optimizer update).

The model is split once into a graph definition and two states: `params` (nnx.Param, trained) and
`rest` (router bias buffers and any other variables, not trained by gradient). Both are created already
sharded (`init_sharded`): the initialiser runs under `jax.jit` with the layout's output shardings, so no
host ever holds the whole model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from glm5_jax.model import GLM5
from glm5_jax.sharding.context import Parallelism, use

BATCH_AXES = ("batch", "length")


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, par: Parallelism):
    """NamedShardings for an nnx State (arrays or ShapeDtypeStructs) from each variable's logical axes."""
    return jax.tree.map(lambda v: v.replace(par.sharding(v.get_metadata()["logical_axes"], v.shape)), state,
                        is_leaf=_is_variable)


class ModelState(NamedTuple):
    graphdef: nnx.GraphDef
    params: nnx.State
    rest: nnx.State


def split(model: GLM5) -> ModelState:
    return ModelState(*nnx.split(model, nnx.Param, ...))


def abstract_state(cfg, seed: int = 0) -> ModelState:
    """The model's state as ShapeDtypeStructs: shapes, dtypes and logical axes, no memory."""
    return split(nnx.eval_shape(lambda: GLM5(cfg, rngs=nnx.Rngs(seed))))


def init_sharded(cfg, par: Parallelism, seed: int = 0) -> ModelState:
    """A randomly initialised model created directly in its sharded layout."""
    abstract = abstract_state(cfg, seed)
    shardings = (state_shardings(abstract.params, par), state_shardings(abstract.rest, par))

    @jax.jit
    def make():
        s = split(GLM5(cfg, rngs=nnx.Rngs(seed)))
        return s.params, s.rest

    with use(par):
        params, rest = jax.jit(make, out_shardings=shardings)()
    return ModelState(abstract.graphdef, params, rest)


def place(state: ModelState, par: Parallelism) -> ModelState:
    """Move an existing (e.g. single-device) model state into the layout `par`."""
    params = jax.device_put(state.params, state_shardings(state.params, par))
    rest = jax.device_put(state.rest, state_shardings(state.rest, par))
    return ModelState(state.graphdef, params, rest)


def batch_shardings(batch, par: Parallelism):
    return {k: par.sharding(BATCH_AXES, v.shape) for k, v in batch.items()}


def cross_entropy(logits, targets, mask):
    """Summed token cross-entropy and token count; logits [..., V] float32, targets int, mask bool."""
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, logz - picked, 0.0)), jnp.sum(mask)


def lm_loss(params, rest, graphdef, batch):
    """Mean next-token cross-entropy of the main head over the batch's scored tokens.

    batch: `input_ids`, `targets`, `positions`, `segment_ids` [B, L] int32; a target < 0 is not scored.
    Returns (loss, aux) with aux = {"tokens": scored token count, "expert_load": [MoE layers, E]}.
    """
    model = nnx.merge(graphdef, params, rest)
    out = model(batch["input_ids"], batch["positions"], batch["segment_ids"], mtp_depths=0)
    targets = batch["targets"]
    total, count = cross_entropy(out.logits, jnp.maximum(targets, 0), targets >= 0)
    return total / jnp.maximum(count, 1), {"tokens": count, "expert_load": out.expert_load}


class TrainStep:
    """`step(params, rest, opt_state, batch) -> (params, opt_state, metrics)`, jitted for one layout.

    Parameters and optimizer state are donated (updated in place); every input and output has an explicit
    sharding. Call it, or `.lower(...)` it with ShapeDtypeStructs for an ahead-of-time plan.
    """

    def __init__(self, state: ModelState, tx: optax.GradientTransformation, par: Parallelism, opt_shardings,
                 batch_sharding):
        self.par, self.tx = par, tx
        graphdef = state.graphdef
        param_sh, rest_sh = state_shardings(state.params, par), state_shardings(state.rest, par)

        def step(params, rest, opt_state, batch):
            (loss, aux), grads = jax.value_and_grad(lm_loss, has_aux=True)(params, rest, graphdef, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "tokens": aux["tokens"]}
            return params, opt_state, metrics

        self._jit = jax.jit(step, in_shardings=(param_sh, rest_sh, opt_shardings, batch_sharding),
                            out_shardings=(param_sh, opt_shardings, None), donate_argnums=(0, 2))

    def __call__(self, params, rest, opt_state, batch):
        with use(self.par):
            return self._jit(params, rest, opt_state, batch)

    def lower(self, params, rest, opt_state, batch):
        with use(self.par):
            return self._jit.lower(params, rest, opt_state, batch)


def init_optimizer(tx: optax.GradientTransformation, params, par: Parallelism):
    """Optimizer state created on device with the shardings XLA propagates from the parameters'."""
    with use(par):
        init = jax.jit(tx.init)
        shardings = init.lower(params).compile().output_shardings
        return jax.jit(tx.init, out_shardings=shardings)(params), shardings


def loss_and_grads(state: ModelState, batch, par: Parallelism | None = None):
    """Loss and parameter gradients, jitted in layout `par` (or on one device): for checking layouts."""
    grad = jax.value_and_grad(lm_loss, has_aux=True)
    fn = jax.jit(lambda params, rest, batch: grad(params, rest, state.graphdef, batch))
    if par is None:
        return fn(state.params, state.rest, batch)
    with use(par):
        return fn(state.params, state.rest, batch)
