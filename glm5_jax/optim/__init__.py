"""GLM-5's optimizer: Muon-Split for matrices, AdamW for the rest, the LR schedules."""

from glm5_jax.optim.config import OptimizerConfig, from_dict
from glm5_jax.optim.muon import (
    MatrixSpec,
    MuonSplitState,
    orthogonalize,
    scale_by_muon_split,
)
from glm5_jax.optim.optimizer import make_optimizer, param_routes, state_shardings
from glm5_jax.optim.routing import Route, print_table, route, route_variables, summary
from glm5_jax.optim.schedules import learning_rate_schedule

__all__ = [
    "MatrixSpec", "MuonSplitState", "OptimizerConfig", "Route", "from_dict", "learning_rate_schedule",
    "make_optimizer", "orthogonalize", "param_routes", "print_table", "route", "route_variables",
    "scale_by_muon_split", "state_shardings", "summary",
]
