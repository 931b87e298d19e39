"""Multi-process jobs started from the `glm5` command line (the cluster launchers are the scripts in launch/).

- `local`: N processes of one `glm5` command on this machine, joined into one JAX job; `command`:
  `glm5 launch local`.
"""
