"""The train step: the one program `glm5 train` runs, `glm5 plan` compiles, `glm5 bench` times, `glm5 eval`
evaluates with and the layout tests check, built from a resolved stage by `build_step` alone.

The model is held as state (`glm5_jax.model.state`): `params` (trained) and `buffers` (router bias), both flat
dicts of dotted names (`glm5_jax.checkpoint.naming`), created already sharded.

What the step optimises is its *objective* (`glm5_jax.train.objectives`): the batch fields, the loss terms and
their normalisers, the metrics, the after-update rule. One optimizer step takes a batch of `accumulate`
microbatches, leaves shaped [accumulate, rows, L], and a traced `count` <= accumulate of them to use (the
batch-size warm-up changes `count`, never the program). The microbatches run one after another in a loop that
sums losses, gradients and the objective's carried values; every loss term is divided by the whole step's
normaliser, so the sum equals the loss of all rows at once. Then one optimizer update, scaled by the learning
rate (an argument: the optimizer runs with rate 1), masked to the stage's trainable set, skipped
(`jnp.where`) when the loss or gradient norm is not finite, and the objective's after-update rule.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from glm5_jax import optim, scopes
from glm5_jax.checkpoint.naming import flatten
from glm5_jax.model.state import ModelState, abstract_state, init_sharded, place, split, state_shardings
from glm5_jax.sharding.context import Parallelism, use
from glm5_jax.train import losses, objectives

__all__ = ["BATCH_AXES", "EvalStep", "ModelState", "StepConfig", "TrainStep", "abstract_state", "build_step",
           "init_sharded", "make_step", "place", "split", "state_shardings"]

BATCH_AXES = (None, "batch", "length")  # [microbatch, row, token]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything that fixes one compiled train step besides the layout and the optimizer."""

    model_cfg: object
    loss_cfg: losses.LossConfig
    rows: int  # rows of one microbatch (all processes together)
    seq_len: int
    accumulate: int = 1  # microbatches per optimizer step (the most a step may use)
    trainable: str = "all"  # "all" | "indexer" (DSA warm-up: everything else frozen) | "no_indexer"
    objective: str = "pretrain"  # glm5_jax.train.objectives.OBJECTIVES

    @property
    def batch_shape(self) -> tuple[int, int, int]:
        return (self.accumulate, self.rows, self.seq_len)

    @property
    def fields(self) -> dict:
        """{batch field: dtype} the step's objective reads."""
        return objectives.OBJECTIVES[self.objective].fields


def _accumulate(fn, batch: dict, count, constrain=lambda x: x):
    """sum over i < count of fn(microbatch i), microbatch after microbatch (one in memory at a time)."""
    micro = lambda i: {k: jax.lax.dynamic_index_in_dim(v, i, keepdims=False) for k, v in batch.items()}
    if next(iter(batch.values())).shape[0] == 1:
        return fn(micro(0))
    zero = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(fn, micro(0)))
    with jax.named_scope(scopes.ACCUMULATE):
        return jax.lax.fori_loop(0, count, lambda i, acc: jax.tree.map(jnp.add, acc, constrain(fn(micro(i)))), zero)


class EvalStep:
    """The step's loss on a batch, no gradient and no update: `evaluate(params, buffers, batch, count) -> metrics`.

    params / buffers: {dotted name: array}; batch: the objective's fields, each [accumulate, rows, L]; count:
    microbatches of the batch to use (int32, traced).
    """

    def __init__(self, spec: StepConfig, par: Parallelism, abstract: ModelState):
        self.spec, self.par, self.abstract = spec, par, abstract
        self.objective = objectives.make(spec.objective, spec.model_cfg, spec.loss_cfg)
        self.param_shardings = flatten(state_shardings(abstract.params, par))
        self.buffer_shardings = flatten(state_shardings(abstract.buffers, par))
        self.batch_sharding = par.sharding(BATCH_AXES, spec.batch_shape)
        self._eval = jax.jit(self._evaluate, in_shardings=(self.param_shardings, self.buffer_shardings,
                                                           self.batch_sharding, None))

    @property
    def depths(self) -> int:
        """MTP depths the loss runs (what the trainer's MFU counts)."""
        return self.objective.depths

    def _loss(self, params, buffers, batch, norms):
        return self.objective.loss(params, buffers, self.abstract, batch, norms)

    def _prepare(self, batch, count):
        """The batch with microbatches from `count` on inert, and the whole step's normalisers."""
        used = jnp.arange(next(iter(batch.values())).shape[0])[:, None, None] < count
        batch = self.objective.unused(batch, used)
        return batch, self.objective.normalizers(batch)

    def _evaluate(self, params, buffers, batch, count):
        batch, norms = self._prepare(batch, count)
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

    As `EvalStep`, plus: lr, bias_rate (the objective's after-update rate): float32 (traced). Params, buffers and
    optimizer state are donated. `compile()` compiles it ahead of time for `abstract_args()` (what `glm5 plan`
    measures); `loss_and_grads` runs what the step differentiates, without the update.
    """

    def __init__(self, spec: StepConfig, tx: optax.GradientTransformation, par: Parallelism, abstract: ModelState):
        super().__init__(spec, par, abstract)
        self.tx = tx
        objective, tmpl_params, tmpl_buffers = self.objective, abstract.params, abstract.buffers
        opt_shape = jax.eval_shape(tx.init, {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                                             for k, v in flatten(tmpl_params).items()})
        self.opt_shardings = optim.state_shardings(opt_shape, self.param_shardings, par.sharding(()))
        mask = None
        if spec.trainable != "all":
            tree = flatten(losses.trainable_mask(tmpl_params, spec.trainable))
            mask = {k: bool(v) for k, v in tree.items()}

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
            moved = objective.after_update(buffers, tmpl_buffers, aux["carry"], rate)
            buffers = buffers if moved is buffers else keep(moved, buffers)
            metrics = {"loss": loss, "grad_norm": gnorm, "finite": ok, "tokens": aux["tokens"], **aux["metrics"],
                       **objective.step_metrics(aux["carry"], count, spec.rows, spec.seq_len)}
            return params, buffers, opt_state, metrics

        shardings = (self.param_shardings, self.buffer_shardings, self.opt_shardings)
        self._jit = jax.jit(step, in_shardings=(*shardings, self.batch_sharding, None, None, None),
                            out_shardings=(*shardings, None), donate_argnums=(0, 1, 2))
        self._compiled = None

    def _loss_and_grads(self, params, buffers, batch, count):
        """((loss, aux), grads) summed over the first `count` microbatches, every term over the step's norms."""
        batch, norms = self._prepare(batch, count)
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
        batch = {k: jax.ShapeDtypeStruct(self.spec.batch_shape, dtype, sharding=self.batch_sharding)
                 for k, dtype in self.spec.fields.items()}
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
        """((loss, aux), grads) of the step's loss, no update: what the step differentiates (to inspect or compare
        gradients, e.g. across layouts)."""
        count = self.spec.accumulate if count is None else count
        with use(self.par):
            return jax.jit(self._loss_and_grads)(params, buffers, batch, jnp.int32(count))


def make_step(spec: StepConfig, par: Parallelism, opt_cfg, abstract: ModelState,
              tx: optax.GradientTransformation | None = None) -> TrainStep:
    """The one place a train step is made: `spec` in layout `par`, the optimizer `opt_cfg` (at learning rate 1:
    `glm5_jax.train.setup.unit_rate_optimizer`) over the model's abstract state (`tx`: one already made of them,
    shared between a run's programs)."""
    tx = optim.make_optimizer(opt_cfg, spec.model_cfg, abstract.params) if tx is None else tx
    return TrainStep(spec, tx, par, abstract)


def build_step(run, stage, abstract: ModelState | None = None, tx: optax.GradientTransformation | None = None):
    """The train step of `stage` of the resolved `run` (`glm5_jax.train.setup.resolve`): the stage's step config
    in the run's layout (that of the stage the run starts in: one run trains in one layout, and a one-stage run's
    is its stage's), the run's optimizer over the base model's abstract state. `glm5 train`, `glm5 plan --recipe`,
    `glm5 bench` and `glm5 eval` build their step here; `abstract` / `tx`: ones a caller already made of
    this run (the trainer's programs share them)."""
    abstract = abstract_state(run.model_cfg, run.recipe.seed) if abstract is None else abstract
    tx = optim.make_optimizer(run.opt_base, run.model_cfg, abstract.params) if tx is None else tx
    return make_step(stage.step, run.par, run.opt_base, abstract, tx)
