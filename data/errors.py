"""Bad input records: one policy (skip or raise), one line naming the file and position, counts per process."""

from __future__ import annotations

import collections
import logging
import threading
import time

from glm5_jax.errors import DataError

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")
# A source whose records are all unusable would otherwise be read (and skipped) forever: after this many bad
# records in a row (or fewer, see `Encoder`), the source is reported as one DataError instead.
MAX_CONSECUTIVE_SKIPS = 10_000
_LOG_FIRST = 5  # skip warnings logged one by one per source; after that at most one per _LOG_EVERY_S seconds
_LOG_EVERY_S = 10.0


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
_last_logged: dict[str, float] = {}
_logged: collections.defaultdict = collections.defaultdict(set)  # source -> the first distinct records logged
_overlong: collections.Counter = collections.Counter()  # (source, "truncated" | "dropped") -> conversations


def skipped_counts() -> dict[str, int]:
    """Records skipped so far in this process, by source name (worker processes keep their own counts)."""
    with _lock:
        return dict(_skipped)


def overlong_counts() -> dict[str, dict[str, int]]:
    """Conversations longer than their row so far in this process, by source: {"truncated": n, "dropped": n}
    (worker processes keep their own counts)."""
    with _lock:
        out: dict[str, dict[str, int]] = {}
        for (source, what), n in _overlong.items():
            out.setdefault(source, {"truncated": 0, "dropped": 0})[what] = n
        return out


def count_overlong(source: str, what: str) -> None:
    with _lock:
        _overlong[source, what] += 1


def reset_skipped_counts():
    with _lock:
        _skipped.clear()
        _overlong.clear()
        _last_logged.clear()
        _logged.clear()


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
        now = time.monotonic()
        with _lock:
            _skipped[source] += 1
            count, seen = _skipped[source], _logged[source]
            # The first _LOG_FIRST distinct bad records are logged (a record repeats every epoch), later ones
            # at most every _LOG_EVERY_S seconds.
            first = message not in seen and len(seen) < _LOG_FIRST
            quiet = not first and now - _last_logged.get(source, -_LOG_EVERY_S) < _LOG_EVERY_S
            if first:
                seen.add(message)
            if not quiet:
                _last_logged[source] = now
        if not quiet:
            later = f"; further skips logged at most every {_LOG_EVERY_S:g} s" if first and len(seen) == _LOG_FIRST \
                else ""
            log.warning("skipped bad record of source %s (%d so far in this process%s): %s", source, count,
                        later, message)
