"""Outputs written whole or not at all: a temporary name while they are written, the final name at the end.

Every command checks its outputs before the work starts (`check_output`: the parent folder exists and is
writable on a file system that is neither read-only nor full, and a file does not go where a folder is); a write
that fails midway (disk full) ends in one `OutputError` line naming the path and the cause (`writing`), and the
temporary output is removed.

Every temporary name is registered while it is written, so a command stopped by a signal before it can
unwind removes them (`remove_in_progress`). This module imports no JAX: the command line calls it while it
stops, whatever the command had imported.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import sys

from glm5_jax.errors import CheckpointError, Glm5Error, OutputError

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


# The causes a write can fail with that the user must fix, as the OS words them (and Orbax / TensorStore quote).
_CAUSES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO)


def check_output(path: str, flag: str, directory: bool = False, inside: bool = False) -> str:
    """The absolute `path` of an output (`flag` names it in errors), checked before any work: its parent folder
    exists, is writable and not on a read-only or full file system; a file output is not a folder (a folder
    output not a file). `inside`: a folder written into and made when missing (a run directory): the folder
    itself, or its nearest existing ancestor, is checked."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    where = f"{flag} {path}" if flag else path
    if inside:
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise OutputError(f"{where}: {parent} is not a directory")
    elif not os.path.isdir(parent):
        raise OutputError(f"{where}: folder {parent} does not exist")
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{where}: exists and is not a directory")
    if not directory and os.path.isdir(path):
        raise OutputError(f"{where}: is a directory; name a file")
    fs = os.statvfs(parent)
    if fs.f_flag & os.ST_RDONLY:
        raise OutputError(f"{where}: folder {parent} is on a read-only file system")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{where}: folder {parent} is not writable")
    if fs.f_bavail == 0:
        raise OutputError(f"{where}: no space left on device (folder {parent})")
    return path


def write_cause(exc: BaseException, path: str) -> str | None:
    """The OS-level cause of a failed write to `path` ('no space left on device'), also when a library quotes it
    inside its own exception or only says it wrote less (then a full file system is the cause); None for any
    other failure (a bug, which keeps its traceback)."""
    if isinstance(exc, OSError) and exc.errno in _CAUSES:
        return os.strerror(exc.errno).lower()
    text = str(exc)
    for code in _CAUSES:
        if os.strerror(code) in text:
            return os.strerror(code).lower()
    folder = os.path.abspath(path)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if isinstance(exc, OSError) and os.statvfs(folder).f_bavail == 0:  # NumPy: "N requested and M written"
        return os.strerror(errno.ENOSPC).lower()
    return None


class _QuietWriteFailures(logging.Filter):
    """Drops the log records of a failed write whose cause `writing` reports in its one line (Orbax logs each
    failed array from its background threads; asyncio, each task whose failure nobody awaited)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return not any(os.strerror(code) in text for code in _CAUSES)


def quiet_write_failures():
    """Leave the report of a failed write to its one line (the command line calls this unless --verbose): no log
    record quoting its cause, and none of the tracebacks TensorStore's callbacks print when the event loop of
    Orbax's failed save has closed under them."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietWriteFailures) for f in logger.filters):
            logger.addFilter(_QuietWriteFailures())
    if not getattr(sys.unraisablehook, "quiet_write_failures", False):
        previous = sys.unraisablehook

        def hook(unraisable):
            if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
                previous(unraisable)

        hook.quiet_write_failures = True
        sys.unraisablehook = hook


@contextlib.contextmanager
def writing(path: str, what: str = "while writing"):
    """A write failure in the block from a cause the user can fix becomes one `OutputError` naming `path`."""
    try:
        yield
    except Glm5Error:
        raise
    except Exception as e:
        cause = write_cause(e, path)
        if cause is None:
            raise
        raise OutputError(f"{path}: {cause} {what}") from None


@contextlib.contextmanager
def atomic_output_dir(out: str, overwrite: bool = False, flag: str = "--out"):
    """Yield a temporary directory beside `out` that becomes `out` only when the block succeeds."""
    out = check_output(out, flag, directory=True)
    if os.path.exists(out) and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    parent = os.path.dirname(out)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with in_progress(tmp):
        try:
            with writing(out):
                os.makedirs(tmp)
                yield tmp
            old = f"{tmp}-replaced"
            if os.path.exists(out):
                os.replace(out, old)  # the old output stays whole until the new one has its name
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temporary name beside the file `path` (with its extension) that becomes `path` only when the
    block succeeds: `path` holds the old file or the new one, never a part."""
    path = os.path.abspath(path)
    stem, ext = os.path.splitext(os.path.basename(path))
    tmp = os.path.join(os.path.dirname(path), f".{stem}.tmp-{os.getpid()}{ext}")
    with in_progress(tmp):
        try:
            with writing(path):
                yield tmp
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_npy(path: str, array):
    """Save `array` as the .npy file `path` (see `atomic_file`)."""
    import numpy as np

    with atomic_file(path) as tmp:
        np.save(tmp, array)
