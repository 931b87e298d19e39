"""Token ids a user passes as a .npy file (`glm5 forward`, `glm5 generate --prompt-ids`), read with one-line
errors that name the flag and the file."""

from __future__ import annotations

import os

import numpy as np

from glm5_jax.errors import InputError


def read_ids(path: str, what: str, shape: tuple | None = None, one_row: bool = False,
             minimum: int | None = None) -> np.ndarray:
    """The int32 array [batch, seq] saved at `path` (the flag `what` names it in errors); with `one_row` a
    1-D array is one row; with `shape` the array must have it; with `minimum` no value may lie below it.
    The values are checked before the cast to int32: an id no int32 holds is refused, never wrapped around."""
    if os.path.isdir(path):
        raise InputError(f"{what} {path}: is a directory, not a .npy file")
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    except (ValueError, EOFError) as e:
        # np.load reads a non-.npy file as a pickle, then refuses it: "pickled (object) data", "Failed to interpret".
        why = "" if "pickle" in str(e) else f" ({str(e).splitlines()[0][:120]})"
        raise InputError(f"{what} {path}: not a .npy file{why}; save the ids with numpy.save") from None
    if isinstance(array, np.lib.npyio.NpzFile):
        names = ", ".join(array.files)
        array.close()
        raise InputError(f"{what} {path}: a .npz archive (of {names or 'no arrays'}), not a .npy file; save the "
                         "ids array alone with numpy.save")
    if one_row and array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{what} {path}: need a {'1-D or ' if one_row else ''}2-D integer array [batch, seq]; "
                         f"got {array.dtype} {array.shape}")
    if array.size == 0:
        raise InputError(f"{what} {path}: is empty (shape {list(array.shape)}); need at least one token per row")
    if shape is not None and array.shape != shape:
        raise InputError(f"{what} {path}: shape {array.shape} differs from --input-ids {shape}")
    low, high = int(array.min()), int(array.max())  # (Python ints: exact for every integer dtype)
    bounds = np.iinfo(np.int32)
    if low < bounds.min or high > bounds.max:
        raise InputError(f"{what} {path}: values [{low}, {high}] ({array.dtype}) lie outside int32, the type of "
                         "token ids and positions")
    if minimum is not None and low < minimum:
        raise InputError(f"{what} {path}: values must be >= {minimum}; got {low}")
    return array.astype(np.int32)
