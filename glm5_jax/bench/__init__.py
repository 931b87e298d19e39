"""`glm5 bench`: what one training step of a recipe stage costs, measured (docs/bench.md).

- `command`: the options and the order of the parts; `build`: the stage, built as `glm5 train` builds it;
- `step`: compile time, step time, tokens/s, MFU, FLOPs and memory of the train step (the compiled FLOPs
  counted by `glm5_jax.accounting`);
- `data`: the data pipeline's rate; `storage`: the disk's rate, checkpoint save / restore and the async
  save's stall; `conversion`: `glm5 convert` in child processes;
- `report`: the console table and the JSON document; `summary`: BENCHMARKS.md from a refresh run.

Building the command line imports only `command` (no JAX); the parts import what they measure.
"""
