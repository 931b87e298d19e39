"""The peer monitor: when a process of the job dies, the others stop within `distributed.peer_timeout`
seconds with one line naming it, instead of waiting in a collective that never completes.

Every process bumps its counter in the coordination service's key-value store (`glm5/alive/P`) a few times
per peer timeout and reads everyone's; a peer whose counter has not moved for the timeout, or a coordinator
that stops answering for as long, is lost: the monitor prints the line and ends the process with exit status
1 (no save is attempted: a save is a collective the lost peer cannot join; the last committed checkpoint is
intact, and an uncommitted one is discarded by the next start). A process that ends normally marks itself
done first, so a peer still finishing its last save does not take it for lost. JAX's own heartbeat timeout
is set to twice this one (`distributed.initialize`), as a backstop.
"""

from __future__ import annotations

import os
import sys
import threading
import time

PREFIX = "glm5/alive/"
DONE = "done"


def _client():
    from jax._src import distributed  # the runtime client jax.distributed.initialize made (multihost_utils' too)

    return getattr(distributed.global_state, "client", None)


def barrier(name: str, timeout: float) -> None:
    """Wait until every process reaches `name` (the coordination service's barrier, not a collective): XLA's
    CPU collectives give a peer only 30 s to join a first collective, less than a compile can take."""
    import jax

    client = _client()
    if jax.process_count() > 1 and client is not None:
        client.wait_at_barrier(f"glm5/{name}", int(timeout * 1000))


class PeerMonitor:
    def __init__(self, timeout: float, last_saved=lambda: None):
        import jax

        self.timeout, self.last_saved = float(timeout), last_saved
        self.me, self.count = jax.process_index(), jax.process_count()
        self.client = _client()
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> PeerMonitor:
        if self.count > 1 and self.client is not None:
            self._thread = threading.Thread(target=self._watch, daemon=True, name="peer-monitor")
            self._thread.start()
        return self

    def explain(self):
        """After a failed collective: give the monitor up to the peer timeout to find the lost peer (it then
        ends the process with its line); returns if every peer is still alive."""
        if self._thread is not None:
            self._thread.join(self.timeout + 2 * max(min(self.timeout / 5, 2.0), 0.2) + 1.0)

    def done(self):
        """This process ends normally: peers no longer expect its heartbeat."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(5.0)
        try:
            self.client.key_value_set(PREFIX + str(self.me), DONE, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may already be gone at the very end
            pass

    def _watch(self):
        interval = max(min(self.timeout / 5, 2.0), 0.2)
        beat, seen, failing_since = 0, {}, None
        start = time.monotonic()
        while not self._stop.wait(interval):
            now = time.monotonic()
            try:
                beat += 1
                self.client.key_value_set(PREFIX + str(self.me), str(beat), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(PREFIX))
                failing_since = None
            except Exception as e:  # noqa: BLE001 - the coordinator (process 0) stopped answering
                failing_since = failing_since or now
                if now - failing_since >= self.timeout and not self._stop.is_set():
                    self._lost(0, now - failing_since, f"the coordinator stopped answering ({_first_line(e)})")
                continue
            for p in range(self.count):
                if p == self.me:
                    continue
                value = values.get(PREFIX + str(p))
                if value == DONE:
                    seen[p] = (value, float("inf"))
                    continue
                last_value, since = seen.get(p, (None, start))
                if value != last_value:
                    seen[p] = (value, now)
                elif now - since >= self.timeout and not self._stop.is_set():
                    self._lost(p, now - since, "no heartbeat")

    def _lost(self, p: int, silent: float, why: str):
        saved = self.last_saved()
        keep = f"the last committed checkpoint (step {saved}) is intact" if saved is not None else \
            "no checkpoint was committed by this run"
        sys.stdout.flush()
        print(f"glm5: error: [process {self.me}] lost process {p} of {self.count}: {why} for {silent:.0f} s "
              f"(distributed.peer_timeout {self.timeout:g} s); stopping; {keep}", file=sys.stderr, flush=True)
        os._exit(1)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]
