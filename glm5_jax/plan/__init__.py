"""`glm5 plan`: compile one full train step ahead of time and report per-device memory and FLOPs.

The step (forward, loss, backward, Muon-Split / AdamW update) is lowered with ShapeDtypeStructs that
carry their shardings and compiled for N simulated CPU devices or a TPU topology (libtpu's compiler, no TPU
needed), so nothing of the model is allocated: the 744B configuration plans on a laptop.

- `devices`: the target (`cpu`, `tpu:v5p-512`, ...) and its devices.
- `measure`: the abstract inputs, the compile, memory and FLOPs (the FLOP model is the model's:
  glm5_jax/accounting/analytic.py).
- `stages`: every stage of a recipe planned with the step that trains it (`--recipe R --stage all`).
- `report`: the tables; `command`: `glm5 plan`, its options and their checks.

Training never imports this package: the plan builds on `glm5_jax.train.step` / `glm5_jax.train.setup`.

Importing the package imports nothing else, so building the command line imports no JAX.
"""
