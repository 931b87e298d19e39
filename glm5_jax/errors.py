"""The one family of errors a user can fix: each message is one line naming the key, flag, file or peer at
fault and what is allowed. `glm5` catches `Glm5Error` once, prints `glm5: <kind>: <message>` and exits with
the class's `exit_status`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class Glm5Error(Exception):
    """Bad input or a state the user must act on, raised before anything partial is written."""

    exit_status = 2
    kind = "error"


class ConfigError(Glm5Error, ValueError):
    """An invalid configuration value, option or layout for the model and stage it is used with."""


class InputError(Glm5Error, ValueError):
    """A user input file or prompt that cannot be used (token ids, prompt text, a flag's value)."""


class DataError(Glm5Error, ValueError):
    """Unusable training data: names the file and the record or line."""


class DistributedError(ConfigError):
    """A multi-process job that could not form: names the variable or the peer at fault."""


class CheckpointError(Glm5Error, RuntimeError):
    """A checkpoint that cannot be read or written: names the path and the cause."""


class CheckpointReadError(CheckpointError):
    """No step of a run's checkpoint directory could be restored."""


class OutputError(Glm5Error, RuntimeError):
    """An output that cannot be written (no parent folder, a folder where a file goes, a read-only or full file
    system): names the path and the cause; nothing partial is left."""


class CheckpointWriteError(CheckpointError):
    """A training checkpoint save that failed (disk full, read-only): the last committed step is intact and the
    uncommitted one was removed."""


class MemoryTooSmall(Glm5Error, RuntimeError):
    """The state a command would materialise does not fit the memory it has: names both figures."""


class ConversionError(Glm5Error, RuntimeError):
    """Input that cannot be converted between HF safetensors and Orbax: names the file or tensor."""


class TrainingStopped(Glm5Error, RuntimeError):
    """The run stopped itself (too many non-finite steps, a stage of another layout); the last committed
    checkpoint is intact."""

    exit_status = 3
    kind = "stopped"
