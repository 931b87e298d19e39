"""Accounting: what a train step costs in FLOPs, counted two ways, and what a device can do.

- `analytic`: the analytic FLOP count of one step from the model config and the layout's numbers (`glm5
  plan`'s table, the trainer's MFU);
- `compiled`: the matrix-product FLOPs of a compiled program (its optimised HLO), every loop at its trip
  count, attributed to the `glm5_jax.scopes` names the program was traced in;
- `loops`: the trip counts of the step's loops whose count XLA cannot know, by scope name;
- `parts`: the model parts BENCHMARKS.md tables, as sets of scope names;
- `peak`: peak FLOP/s of one device by device kind (MFU's denominator).

This package may import the model and sharding (it counts them); the model, sharding and optimizer never
import it: they only open the scopes of `glm5_jax.scopes`.
"""
