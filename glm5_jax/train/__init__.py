"""Training: sharded model state, losses and the jitted train step."""
