"""What the active layout runs a forward pass with: the routed-expert function and whether a layer group
runs as a pipeline, chosen in one place from the layout's axis sizes (model code never tests them)."""

from __future__ import annotations

import dataclasses

import jax

from glm5_jax.sharding.context import Parallelism, current
from glm5_jax.sharding.expert import expert_parallel_ffn


@dataclasses.dataclass(frozen=True)
class Runners:
    platform: str  # the devices the program is for ("cpu", "gpu", "tpu")
    expert_shards: int  # devices the routed experts split over
    token_shards: int  # devices the tokens split over (batch and context shards)
    pipeline_stages: int  # pipeline stages (1: no pipeline)
    par: Parallelism | None  # the layout (None: one device, plain jax.jit)

    def experts(self, local):
        """The layout's routed-expert function of `local`, the grouped matmul of experts on one device.

        local(x, idx, weights, gate, up, down, n_experts) -> (y [T, D], load [E]); the result takes
        (x, idx, weights, gate, up, down): `local` itself on one expert shard, else `local` inside the
        expert-parallel dispatch (sharding/expert.py), which with tokens split and no expert axis runs each
        device's tokens on it. Under a pipeline without an expert axis GSPMD keeps the local form (jax 0.10
        cannot differentiate the tiled matmul inside a shard_map under the pipeline's vmap).
        """
        if self.expert_shards == 1 and (self.token_shards == 1 or self.pipelined):
            return lambda x, idx, weights, gate, up, down: local(x, idx, weights, gate, up, down, gate.shape[0])
        return lambda *args: expert_parallel_ffn(*args, par=self.par, experts=local)

    @property
    def pipelined(self) -> bool:
        """One layer group runs as a pipeline over the stages (sharding/pipeline.py)."""
        return self.pipeline_stages > 1


def runners(par: Parallelism | None = None) -> Runners:
    """The runners of layout `par` (default: the active one; none active: one device)."""
    par = par or current()
    if par is None:
        return Runners(jax.default_backend(), 1, 1, 1, None)
    return Runners(par.platform, par.axis_size("experts"), par.axis_size("batch") * par.axis_size("length"),
                   par.axis_size("pipeline_stages"), par)
