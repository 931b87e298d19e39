"""The train step: the one program `glm5 train` runs, `glm5 plan` compiles and the layout tests check.

The model is split once into a graph definition and two states: `params` (nnx.Param, trained) and `buffers`
(router bias buffers, not trained by gradient), both held as flat dicts of dotted names
(`glm5_jax.checkpoint.naming`). Both are created already sharded (`init_sharded`), so no host ever holds
the whole model.

One optimizer step takes a batch of `accumulate` microbatches, leaves shaped [accumulate, rows, L], and a
traced `count` <= accumulate of them to use (the batch-size warm-up changes `count`, never the program). The
microbatches run one after another in a loop that sums losses, gradients, expert loads and metrics; every
loss term is divided by the whole step's normaliser (`losses.normalizers`), so the sum equals the loss of
all rows at once. Then one optimizer update, scaled by the learning rate (an argument: the optimizer runs
with rate 1), masked to the stage's trainable set, skipped (`jnp.where`) when the loss or gradient norm is
not finite, and one router-bias update from the step's summed expert loads.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from glm5_jax import optim, scopes
from glm5_jax.checkpoint.naming import flatten, to_state
from glm5_jax.data.loader import global_batch
from glm5_jax.model import GLM5, layer_groups
from glm5_jax.sharding.context import Parallelism, use
from glm5_jax.train import losses

BATCH_KEYS = ("input_ids", "targets", "positions", "segment_ids")
BATCH_AXES = (None, "batch", "length")  # [microbatch, row, token]


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state, par: Parallelism):
    """NamedShardings for an nnx State (arrays or ShapeDtypeStructs) from each variable's logical axes."""
    return jax.tree.map(lambda v: v.replace(par.sharding(v.get_metadata()["logical_axes"], v.shape)), state,
                        is_leaf=_is_variable)


class ModelState(NamedTuple):
    graphdef: nnx.GraphDef
    params: nnx.State
    buffers: nnx.State


def split(model: GLM5) -> ModelState:
    return ModelState(*nnx.split(model, nnx.Param, ...))


def abstract_state(cfg, seed: int = 0) -> ModelState:
    """The model's state as ShapeDtypeStructs: shapes, dtypes and logical axes, no memory."""
    return split(nnx.eval_shape(lambda: GLM5(cfg, rngs=nnx.Rngs(seed))))


def init_sharded(cfg, par: Parallelism, seed: int = 0) -> ModelState:
    """A randomly initialised model created directly in its sharded layout."""
    abstract = abstract_state(cfg, seed)
    shardings = (state_shardings(abstract.params, par), state_shardings(abstract.buffers, par))

    def make():
        s = split(GLM5(cfg, rngs=nnx.Rngs(seed)))
        return s.params, s.buffers

    with use(par):
        params, buffers = jax.jit(make, out_shardings=shardings)()
    return ModelState(abstract.graphdef, params, buffers)


def place(state: ModelState, par: Parallelism) -> ModelState:
    """Move an existing (e.g. single-device) model state into the layout `par`."""
    params = jax.device_put(state.params, state_shardings(state.params, par))
    buffers = jax.device_put(state.buffers, state_shardings(state.buffers, par))
    return ModelState(state.graphdef, params, buffers)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything that fixes one compiled train step besides the layout and the optimizer."""

    model_cfg: object
    loss_cfg: losses.LossConfig
    rows: int  # rows of one microbatch (all processes together)
    seq_len: int
    accumulate: int = 1  # microbatches per optimizer step (the most a step may use)
    trainable: str = "all"  # "all" | "indexer" (DSA warm-up: everything else frozen)

    @property
    def batch_shape(self) -> tuple[int, int, int]:
        return (self.accumulate, self.rows, self.seq_len)


def place_batch(par: Parallelism, spec: StepConfig, local_micro_rows: int, local: dict):
    """This process's rows of a step (its microbatches of `local_micro_rows` rows, concatenated) as the step's
    global batch [accumulate, rows, L] (slots past their count zero: the step never reads them), and the count."""
    count = len(local["input_ids"]) // local_micro_rows
    arrays = {k: np.zeros((spec.accumulate, local_micro_rows, spec.seq_len), np.int32) for k in BATCH_KEYS}
    for k in arrays:
        arrays[k][:count] = np.asarray(local[k]).reshape(count, local_micro_rows, spec.seq_len)
    return global_batch(arrays, par.sharding(BATCH_AXES, spec.batch_shape)), count


def _only_first(batch: dict, count) -> dict:
    """`batch` with microbatches from `count` on unscored (no targets, padding segments)."""
    used = jnp.arange(batch["targets"].shape[0])[:, None, None] < count
    return {**batch, "targets": jnp.where(used, batch["targets"], -1),
            "segment_ids": jnp.where(used, batch["segment_ids"], 0)}


def _accumulate(fn, batch: dict, count, constrain=lambda x: x):
    """sum over i < count of fn(microbatch i), microbatch after microbatch (one in memory at a time)."""
    micro = lambda i: {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in batch.items()}
    if batch["targets"].shape[0] == 1:
        return fn(micro(0))
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, micro(0)))
    with jax.named_scope(scopes.ACCUMULATE):
        return jax.lax.fori_loop(0, count, lambda i, acc: jax.tree.map(jnp.add, acc, constrain(fn(micro(i)))), zero)


class EvalStep:
    """The step's loss on a batch, no gradient and no update: `evaluate(params, buffers, batch, count) -> metrics`.

    params / buffers: {dotted name: array}; batch: BATCH_KEYS -> int32 [accumulate, rows, L]; count: microbatches
    of the batch to use (int32, traced).
    """

    def __init__(self, spec: StepConfig, par: Parallelism, abstract: ModelState):
        self.spec, self.par, self.abstract = spec, par, abstract
        self.param_shardings = flatten(state_shardings(abstract.params, par))
        self.buffer_shardings = flatten(state_shardings(abstract.buffers, par))
        self.batch_sharding = par.sharding(BATCH_AXES, spec.batch_shape)
        self.depths = losses.mtp_depths(spec.model_cfg, spec.loss_cfg)
        self._eval = jax.jit(self._evaluate, in_shardings=(self.param_shardings, self.buffer_shardings,
                                                           self.batch_sharding, None))

    def _loss(self, params, buffers, batch, norms):
        graphdef, tmpl_params, tmpl_buffers = self.abstract
        return losses.total_loss(to_state(params, tmpl_params), to_state(buffers, tmpl_buffers), graphdef, batch,
                                 self.spec.loss_cfg, norms=norms)

    def _evaluate(self, params, buffers, batch, count):
        batch = _only_first(batch, count)
        norms = losses.normalizers(batch, self.depths)
        loss, aux = _accumulate(lambda micro: self._loss(params, buffers, micro, norms), batch, count)
        return {"loss": loss, "tokens": aux["tokens"], **aux["metrics"]}

    def abstract_variables(self) -> dict:
        """{dotted name: ShapeDtypeStruct with its sharding} of every model variable (params and buffers)."""
        sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        return {**{k: sds(v, self.param_shardings[k]) for k, v in flatten(self.abstract.params).items()},
                **{k: sds(v, self.buffer_shardings[k]) for k, v in flatten(self.abstract.buffers).items()}}

    def evaluate(self, params, buffers, batch, count=None) -> dict:
        """Loss and its terms on `batch` (on device)."""
        count = self.spec.accumulate if count is None else count
        with use(self.par):
            return self._eval(params, buffers, batch, jnp.int32(count))


class TrainStep(EvalStep):
    """`step(params, buffers, opt_state, batch, count, lr, bias_rate) -> (params, buffers, opt_state, metrics)`.

    As `EvalStep`, plus: lr, bias_rate: float32 (traced). Params, buffers and optimizer state are donated.
    `compile()` compiles it ahead of time for `abstract_args()` (what `glm5 plan` measures); `loss_and_grads`
    runs what the step differentiates, without the update.
    """

    def __init__(self, spec: StepConfig, tx: optax.GradientTransformation, par: Parallelism, abstract: ModelState):
        super().__init__(spec, par, abstract)
        self.tx = tx
        graphdef, tmpl_params, tmpl_buffers = abstract
        opt_shape = jax.eval_shape(tx.init, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                             for k, v in flatten(tmpl_params).items()})
        self.opt_shardings = optim.state_shardings(opt_shape, self.param_shardings, par.sharding(()))
        mask = None
        if spec.trainable != "all":
            tree = flatten(losses.trainable_mask(tmpl_params, spec.trainable))
            mask = {k: bool(v) for k, v in tree.items()}
        cfg = spec.model_cfg
        n_main = sum(g.count for g in layer_groups(cfg) if g.moe)
        use_bias = spec.loss_cfg.bias_update_rate > 0

        def step(params, buffers, opt_state, batch, count, lr, rate):
            (loss, aux), grads = self._loss_and_grads(params, buffers, batch, count)
            if mask is not None:
                grads = {k: g if mask[k] else jnp.zeros_like(g) for k, g in grads.items()}
            gnorm = optax.global_norm(grads)
            ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
            updates, new_opt = tx.update(grads, opt_state, params)
            updates = {k: (u * lr).astype(u.dtype) if mask is None or mask[k] else jnp.zeros_like(u)
                       for k, u in updates.items()}
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
            params, opt_state = keep(new_params, params), keep(new_opt, opt_state)
            load = aux["expert_load"]
            if use_bias and load is not None:
                buffers = keep(flatten(losses.update_router_bias(to_state(buffers, tmpl_buffers), load, rate)), buffers)
            metrics = {"loss": loss, "grad_norm": gnorm, "finite": ok, "tokens": aux["tokens"], **aux["metrics"]}
            if load is not None:
                load = load.astype(jnp.float32)
                mean = jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
                metrics["expert_load_max_over_mean"] = jnp.mean(jnp.max(load, axis=-1) / mean)
                copies = count * spec.rows * spec.seq_len * cfg.num_experts_per_tok * n_main
                metrics["dropped"] = 1.0 - jnp.sum(load[:n_main]) / copies  # (MTP's row, if any, is last)
            return params, buffers, opt_state, metrics

        shardings = (self.param_shardings, self.buffer_shardings, self.opt_shardings)
        self._jit = jax.jit(step, in_shardings=(*shardings, self.batch_sharding, None, None, None),
                            out_shardings=(*shardings, None), donate_argnums=(0, 1, 2))
        self._compiled = None

    def _loss_and_grads(self, params, buffers, batch, count):
        """((loss, aux), grads) summed over the first `count` microbatches, every term over the step's norms."""
        batch = _only_first(batch, count)
        norms = losses.normalizers(batch, self.depths)
        grad = jax.value_and_grad(self._loss, has_aux=True)
        constrain = lambda out: (out[0], jax.lax.with_sharding_constraint(out[1], self.param_shardings))
        return _accumulate(lambda micro: grad(params, buffers, micro, norms), batch, count, constrain)

    def abstract_args(self) -> tuple:
        """ShapeDtypeStructs (with shardings) of every argument: the ahead-of-time plan's inputs."""
        sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        variables = self.abstract_variables()
        params = {k: variables[k] for k in self.param_shardings}
        buffers = {k: variables[k] for k in self.buffer_shardings}
        opt_state = jax.tree.map(sds, jax.eval_shape(self.tx.init, params), self.opt_shardings)
        batch = {k: jax.ShapeDtypeStruct(self.spec.batch_shape, jnp.int32, sharding=self.batch_sharding)
                 for k in BATCH_KEYS}
        scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)
        return params, buffers, opt_state, batch, scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.float32)

    def __call__(self, params, buffers, opt_state, batch, count, lr, bias_rate):
        fn = self._jit if self._compiled is None else self._compiled
        with use(self.par):
            return fn(params, buffers, opt_state, batch, jnp.int32(count), jnp.float32(lr), jnp.float32(bias_rate))

    def lower(self, *args):
        """The step lowered for `args` (ShapeDtypeStructs with shardings; default `abstract_args()`)."""
        with use(self.par):
            return self._jit.lower(*(args or self.abstract_args()))

    def compile(self):
        """Compile ahead of time for `abstract_args()`; later calls run this executable."""
        self._compiled = self.lower().compile()
        return self._compiled

    def init_optimizer(self, params):
        """The optimizer state of `params`, created on device in its shardings."""
        with use(self.par):
            return jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)

    def loss_and_grads(self, params, buffers, batch, count=None):
        """((loss, aux), grads) of the step's loss, no update: what the step differentiates, for tests."""
        count = self.spec.accumulate if count is None else count
        with use(self.par):
            return jax.jit(self._loss_and_grads)(params, buffers, batch, jnp.int32(count))
