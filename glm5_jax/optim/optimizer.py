"""`make_optimizer`: GLM-5's optimizer as one Optax transformation over the model's `nnx.Param` state.

    muon   -> scale_by_muon_split -> add_decayed_weights(wd) -> scale_by_learning_rate(schedule)
    adamw  -> optax.adamw(schedule, b1, b2, eps, weight_decay)
    frozen -> optax.set_to_zero()
joined by `optax.partition` with labels from `routing.route` (by dotted parameter name).
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from glm5_jax.dotted import dotted_name
from glm5_jax.optim.config import OptimizerConfig
from glm5_jax.optim.muon import scale_by_muon_split
from glm5_jax.optim.routing import MUON, Route, route_variables
from glm5_jax.optim.schedules import learning_rate_schedule


def find_param(names, path) -> str | None:
    """The parameter a key path points into: the longest run of its dotted parts that is a name in `names`
    (a parameter's own path, optionally ending in `.value`, or an optimizer-state path that contains one)."""
    parts = dotted_name(path).split(".")
    for length in range(len(parts), 0, -1):
        for start in range(len(parts) - length + 1):
            if (name := ".".join(parts[start:start + length])) in names:
                return name
    return None


def lookup(routes: dict[str, Route], path) -> Route:
    name = find_param(routes, path)
    if name is None:
        raise KeyError(f"{dotted_name(path)}: not a parameter the optimizer was built for")
    return routes[name]


def state_shardings(opt_state, param_shardings, default):
    """Shardings for an optimizer state (real or from `jax.eval_shape(tx.init, params)`): every leaf that
    mirrors a parameter takes that parameter's sharding (from `param_shardings`, a tree with the params'
    key paths), every other leaf (step counts) `default`."""
    by_name = {dotted_name(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    by_name.update({n.removesuffix(".value"): s for n, s in list(by_name.items())})

    def pick(path, leaf):
        name = find_param(by_name, path)
        return by_name[name] if name is not None and leaf.ndim else default

    return jax.tree_util.tree_map_with_path(pick, opt_state)


def param_routes(params, model_cfg, opt: OptimizerConfig) -> dict[str, Route]:
    """Routes for a GLM5 module or its `nnx.Param` state (real or from `nnx.eval_shape`)."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    variables = {dotted_name(p): v for p, v in nnx.to_flat_state(params)}
    return route_variables(variables, model_cfg, opt)


def make_optimizer(opt: OptimizerConfig, model_cfg, params) -> optax.GradientTransformation:
    """GLM-5's optimizer for `params` (a GLM5 module or its `nnx.Param` state, real or abstract).

    The returned transformation takes any tree with the same key paths: the `nnx.State` of params, or its
    pure dict. Optimizer state mirrors the parameter tree, so it shards like the parameters.
    """
    routes = param_routes(params, model_cfg, opt)
    schedule = learning_rate_schedule(opt)
    mu_dtype = None if opt.mu_dtype is None else jax.numpy.dtype(opt.mu_dtype)
    muon = optax.chain(
        scale_by_muon_split(lambda path: lookup(routes, path).spec, beta=opt.momentum, nesterov=opt.nesterov,
                            ns_coeffs=opt.ns_coeffs, ns_steps=opt.ns_steps, consistent_rms=opt.consistent_rms,
                            mu_dtype=mu_dtype),
        optax.add_decayed_weights(opt.weight_decay),
        optax.scale_by_learning_rate(schedule),
    )
    adamw = optax.adamw(schedule, b1=opt.adam_b1, b2=opt.adam_b2, eps=opt.adam_eps,
                        weight_decay=opt.decoupled_adam_weight_decay, mu_dtype=mu_dtype, nesterov=opt.adam_nesterov)

    def labels(tree):
        return jax.tree_util.tree_map_with_path(lambda path, _: lookup(routes, path).optimizer, tree)

    return optax.partition({MUON: muon, "adamw": adamw, "frozen": optax.set_to_zero()}, labels)
