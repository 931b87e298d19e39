"""Model checkpoints in Orbax format: streaming writes, array-at-a-time reads, and model restore.

- `store`: the model checkpoint (write, read, restore); `naming`: dotted variable names; `outputs`: outputs
  written whole or not at all; `manager`: the training checkpoint; `command`: `glm5 init` and `glm5 forward`.

Importing the package imports nothing else, so building the command line imports no JAX.
"""
