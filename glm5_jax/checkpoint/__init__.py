"""Model checkpoints in Orbax format: streaming writes, array-at-a-time reads, and model restore."""

from glm5_jax.checkpoint.store import (
    CheckpointError,
    CheckpointReader,
    abstract_leaves,
    atomic_output_dir,
    describe_read_error,
    load_model,
    save_model,
    write_streaming,
)

__all__ = ["CheckpointError", "CheckpointReader", "abstract_leaves", "atomic_output_dir", "describe_read_error", "load_model",
           "save_model", "write_streaming"]
