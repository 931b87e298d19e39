"""Bad input records: one policy (skip or raise), one line naming the file and position, counts per process."""

from __future__ import annotations

import collections
import logging
import threading

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")


class DataError(ValueError):
    """Unusable input data: the message is one line naming the file and the record or line."""


class Bad:
    """A record that could not be read or encoded; sources return it instead of raising.

    Raising inside a Grain read thread or worker would end the whole pipeline with a traceback from deep
    inside Grain; returning a marker lets the :class:`ErrorPolicy` decide (skip and count, or raise one line).
    """

    __slots__ = ("reason", "where")

    def __init__(self, where: str, reason: str):
        self.where, self.reason = where, reason

    def __repr__(self):
        return f"Bad({self.where!r}, {self.reason!r})"


_lock = threading.Lock()
_skipped: collections.Counter = collections.Counter()


def skipped_counts() -> dict[str, int]:
    """Records skipped so far in this process, by source name (worker processes keep their own counts)."""
    with _lock:
        return dict(_skipped)


def reset_skipped_counts():
    with _lock:
        _skipped.clear()


class ErrorPolicy:
    """What to do with a bad record: ``skip`` (count it, log it, go on) or ``raise`` (:class:`DataError`)."""

    def __init__(self, mode: str = "skip"):
        if mode not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}; got {mode!r}")
        self.mode = mode

    def handle(self, source: str, bad: Bad) -> None:
        message = f"{bad.where}: {bad.reason}"
        if self.mode == "raise":
            raise DataError(f"source {source}: {message} (set on_error: skip to skip such records)")
        with _lock:
            _skipped[source] += 1
            count = _skipped[source]
        log.warning("skipped bad record of source %s (%d so far in this process): %s", source, count, message)
