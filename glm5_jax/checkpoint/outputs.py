"""Outputs written whole or not at all: a temporary name while they are written, the final name at the end.

Every temporary name is registered while it is written, so a command stopped by a signal before it can
unwind removes them (`remove_in_progress`). This module imports no JAX: the command line calls it while it
stops, whatever the command had imported.
"""

from __future__ import annotations

import contextlib
import os
import shutil

from glm5_jax.errors import CheckpointError

_in_progress: set[str] = set()  # temporary outputs being written, for a command stopped by a signal


@contextlib.contextmanager
def in_progress(path: str):
    """Mark `path` as a temporary output for the duration of the block (see `remove_in_progress`)."""
    _in_progress.add(path)
    try:
        yield path
    finally:
        _in_progress.discard(path)


def remove_in_progress():
    """Delete every temporary output still being written (a command stopping without unwinding)."""
    for path in list(_in_progress):
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.exists(path):
            os.remove(path)


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool = False):
    """Yield a temporary directory beside `out` that becomes `out` only when the block succeeds."""
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise CheckpointError(f"{out}: exists and is not a directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with in_progress(tmp):
        os.makedirs(tmp)
        try:
            yield tmp
            old = f"{tmp}-replaced"
            if os.path.exists(out):
                os.replace(out, old)  # the old output stays whole until the new one has its name
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_npy(path: str, array):
    """Save `array` as the .npy file `path`, which holds the old file or the new one, never a part."""
    import numpy as np

    tmp = f"{path}.tmp-{os.getpid()}.npy"
    with in_progress(tmp):
        try:
            np.save(tmp, array)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
