"""Training checkpoints: when to save, restore-or-init, and sharded asynchronous Orbax saves of everything a
resume needs.

One `ocp.CheckpointManager` directory (`RUN_DIR/checkpoints`); each step holds the named items the run
declares when it opens the manager (`items`: name -> `ARRAYS`, a pytree of sharded arrays, or `DOCUMENT`, a
JSON document). The manager knows only the kinds: what an item means is its owner's business (the
trainer's items are listed in docs/training.md; an objective may add its own). By convention `params` (every
model variable as a nested dict of dotted names) and `config` (the model config) are the model items that
`glm5 convert orbax-to-hf`, `glm5 forward` and `load_model` read.

Every process takes part in every save and restore (Orbax's saves are collectives: each process writes its
shards, process 0 commits); the trainer makes sure all processes decide to save at the same steps.
Restores take targets with the *current* layout's shardings, so a run saved on one mesh goes on on another.
A latest step that cannot be read (never committed, missing files, an unreadable array or config) is skipped
with a warning, moved aside to `RUN_DIR/checkpoints-bad/`, and the newest readable committed step is used; when
no step reads, nothing is moved and `CheckpointReadError` names the newest step's problem.

The save policy (`SavePolicy`): every `interval_steps` steps, every `interval_seconds` seconds, at the last
step of every stage, on SIGTERM (`watch_sigterm`) and when the run ends.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import threading
import time

import jax
import orbax.checkpoint as ocp

from glm5_jax.checkpoint.naming import nest, unnest
from glm5_jax.checkpoint.outputs import write_cause
from glm5_jax.checkpoint.store import CheckpointReader
from glm5_jax.errors import CheckpointReadError, CheckpointWriteError, Glm5Error

log = logging.getLogger("glm5.train")

ARRAYS, DOCUMENT = "arrays", "document"  # the kinds of item a checkpoint step holds
WRITERS_TIMEOUT_S = 60  # how long a failed save's other writers get to end before its files are removed

class CheckpointManager:
    """A run's checkpoints and its save policy (`policy`: interval_steps, interval_seconds, max_to_keep,
    async_save, save_at_stage_end, save_on_exit: the recipe's `checkpoint` section); `items`: {name: ARRAYS or
    DOCUMENT}, what every step holds."""

    def __init__(self, directory: str, policy, items: dict[str, str]):
        bad = {k: v for k, v in items.items() if v not in (ARRAYS, DOCUMENT)}
        if bad:
            raise ValueError(f"checkpoint items of unknown kind: {bad}")
        self.directory = os.path.abspath(directory)
        self.policy, self.items = policy, dict(items)
        self.mngr = self._open()
        self.last_saved: int | None = None
        self._in_flight: int | None = None  # the step an asynchronous save is writing
        self._saved_at = time.monotonic()
        self.sigterm = False

    def _open(self) -> ocp.CheckpointManager:
        if jax.process_count() == 1:
            # Replica-parallel saving cuts every replicated array into one slice per replica (a dispatch each,
            # and a compile each on the first save: 16 s of a 4 MB quickstart save); it only pays across hosts.
            ocp.type_handlers.register_type_handler(
                jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
        options = ocp.CheckpointManagerOptions(max_to_keep=self.policy.max_to_keep, create=True,
                                               enable_async_checkpointing=self.policy.async_save,
                                               cleanup_tmp_directories=True)
        return ocp.CheckpointManager(self.directory, options=options)

    # -- when to save ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def watch_sigterm(self):
        """While inside, SIGTERM sets `self.sigterm` (the loop saves and stops after its current step); a
        second SIGTERM stops at once (KeyboardInterrupt), whatever the process is waiting on."""
        def handler(signum, frame):
            if self.sigterm:
                raise KeyboardInterrupt("second SIGTERM")
            self.sigterm = True
        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals alone
            previous = None
        try:
            yield self
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def due(self, step: int, stage_end: bool) -> bool:
        """Whether the policy saves after `step` (SIGTERM and the run's end are the loop's to handle)."""
        p = self.policy
        return ((p.interval_steps is not None and step % p.interval_steps == 0)
                or (p.interval_seconds is not None and time.monotonic() - self._saved_at >= p.interval_seconds)
                or (p.save_at_stage_end and stage_end))

    # -- save -------------------------------------------------------------------------------------------

    def save(self, step: int, values: dict):
        """Save step `step`: `values` holds every declared item ({name: pytree of arrays or JSON document});
        asynchronous unless the policy says not."""
        if set(values) != set(self.items):
            raise ValueError(f"checkpoint save: items {sorted(values)} differ from the declared {sorted(self.items)}")
        save = {ARRAYS: ocp.args.PyTreeSave, DOCUMENT: ocp.args.JsonSave}
        self.wait()  # (Orbax waits for the save in flight too; here its failure names its own step)
        with self._saving(step):
            self._in_flight = step
            self.mngr.save(step, args=ocp.args.Composite(**{k: save[self.items[k]](v) for k, v in values.items()}),
                           force=True)
        if not self.policy.async_save:
            self.wait()
        self.last_saved, self._saved_at = step, time.monotonic()

    def wait(self):
        """Wait for the save in flight; its failure (raised here by Orbax's background writer) is this one's."""
        if self._in_flight is not None:
            with self._saving(self._in_flight):
                self.mngr.wait_until_finished()
            self._in_flight = None

    @contextlib.contextmanager
    def _saving(self, step: int):
        """A save of `step` that fails from a cause the user can fix (disk full, read-only) ends the run in one
        `CheckpointWriteError` line; the uncommitted step is removed, the committed ones stay as they were."""
        try:
            yield
        except Glm5Error:
            raise
        except Exception as e:
            cause = write_cause(e, self.directory)
            if cause is None:
                raise
            self._in_flight = None
            _join_orbax_threads(WRITERS_TIMEOUT_S)
            self._remove_uncommitted(step)
            raise CheckpointWriteError(f"{os.path.dirname(self.directory)}: {cause} while saving step {step}") from None

    def _remove_uncommitted(self, step: int):
        if jax.process_index() != 0:  # (the run directory is shared: one process removes it)
            return
        for name in os.listdir(self.directory):
            path = os.path.join(self.directory, name)
            if name.split(".")[0] == str(step) and not ocp.utils.is_checkpoint_finalized(path):
                shutil.rmtree(path, ignore_errors=True)

    def close(self):
        """Wait for a save in flight, then release the manager (again: nothing)."""
        if self.mngr is not None:
            try:
                self.wait()
            finally:
                self.mngr.close()
                self.mngr = None

    # -- restore ----------------------------------------------------------------------------------------

    def committed_steps(self) -> list[int]:
        return self.committed_in(self.directory)

    @staticmethod
    def committed_in(directory: str) -> list[int]:
        """The committed (finalised) checkpoint steps in `directory`, oldest first ([] when there is none)."""
        steps = ocp.utils.checkpoint_steps(directory) if os.path.isdir(directory) else []
        return sorted(s for s in steps if ocp.utils.is_checkpoint_finalized(os.path.join(directory, str(s))))

    def restore_latest(self, targets: dict, check=lambda restored: None, warn=log.warning):
        """(step, {item: value}, check's result) of the newest readable committed step, or None when there is no
        committed step. `targets`: {array item: pytree of ShapeDtypeStructs with this run's shardings}; every
        document item is read as JSON. `check(restored)` runs inside the attempt (e.g. opening the data feed at
        the saved data state): a failure there, as any failure to read, makes the step unreadable and the
        previous one is tried. Unreadable newer steps are set aside once a step reads."""
        failures = []
        for step in reversed(self.committed_steps()):
            missing = [i for i in self.items if not os.path.isdir(os.path.join(self.directory, str(step), i))]
            try:
                if missing:
                    raise ValueError(f"items missing: {', '.join(missing)}")
                args = {k: ocp.args.PyTreeRestore(targets[k], restore_args=_restore_args(targets[k]))
                        if kind == ARRAYS else ocp.args.JsonRestore() for k, kind in self.items.items()}
                restored = dict(self.mngr.restore(step, args=ocp.args.Composite(**args)))
                checked = check(restored)
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous step
                failures.append((step, _reason(e)))
                continue
            for bad, reason in failures:
                self._set_aside(bad, f"unreadable ({reason})", step, warn)
            self.last_saved = step
            return step, restored, checked
        if failures:
            step, reason = failures[0]
            raise CheckpointReadError(f"{self.directory}: no checkpoint step could be restored (nothing was "
                                      f"moved); newest step {step}: {reason}")
        return None

    def _set_aside(self, step: int, reason: str, using: int, warn):
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(os.path.dirname(self.directory), "checkpoints-bad", f"{step}-{int(time.time())}")
        warn(f"checkpoint step {step} in {self.directory} is {reason}; moved to {dst}; "
             f"resuming from the previous committed step {using}")
        self.mngr.close()
        if jax.process_index() == 0:  # (the run directory is shared: one process moves it)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if os.path.exists(src):
                shutil.move(src, dst)
        self.mngr = self._open()


def _join_orbax_threads(timeout: float):
    """Wait for the threads Orbax runs a save on. Its commit writes each item on a thread of its own and reports
    the first failure while the others go on; removed under them, their step's directory would fail them with
    tracebacks of their own, or come back in part. (A finished save leaves no such thread.)"""
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t is not threading.current_thread() and type(t).__module__.startswith("orbax."):
            t.join(max(0.0, deadline - time.monotonic()))


def _reason(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else e.__class__.__name__


def _restore_args(target):
    return ocp.checkpoint_utils.construct_restore_args(target)


def load_variables(directory: str, abstract: dict, key: str = "init_from", step: int | None = None) -> dict:
    """Every variable of a model checkpoint's step (default its newest committed one; a converted HF model or
    another run's training checkpoint) restored straight into `abstract`'s shardings ({dotted name:
    ShapeDtypeStruct})."""
    from glm5_jax.errors import ConfigError

    reader = CheckpointReader(directory, step)
    missing = sorted(set(abstract) - set(reader.names))
    if missing:
        raise ConfigError(f"{key}: {reader.directory} lacks variables this model needs, e.g. {missing[0]}")
    target = nest(abstract)
    with ocp.CheckpointManager(reader.directory, item_handlers={"params": ocp.PyTreeCheckpointHandler()}) as mngr:
        restored = mngr.restore(reader.step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
            target, restore_args=_restore_args(target))))["params"]
    return unnest(restored)
