"""The model as state: split once into a graph definition, its parameters (`nnx.Param`, trained) and its
buffers (the router bias, moved by a rule, not by gradient), created or placed in a layout's shardings.

Training, planning, evaluation and decoding all hold the model this way; the shardings come from each
variable's logical axes through the layout (`Parallelism.sharding`), so no host ever holds the whole model.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from flax import nnx

from glm5_jax.model.transformer import GLM5
from glm5_jax.sharding.context import Parallelism, use


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
