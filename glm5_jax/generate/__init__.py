"""Generation: a latent decode cache, prefill and decode steps, sampling, MTP speculative decoding.

- `cache`, `step`, `sampling`, `speculative`, `runner` (`Generator`); `command`: `glm5 generate`.

Importing the package imports nothing else, so building the command line imports no JAX.
"""
