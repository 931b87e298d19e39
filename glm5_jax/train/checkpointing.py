"""Training checkpoints: sharded, asynchronous Orbax saves of everything a resume needs.

One `ocp.CheckpointManager` directory (`RUN_DIR/checkpoints`); each step holds the items

| item | content |
|---|---|
| `params` | every model variable (parameters and router bias buffers) as a nested dict of dotted names, the layout of `glm5_jax.checkpoint` (so `glm5 convert orbax-to-hf`, `glm5 forward` and `load_model` read it) |
| `config` | the model config as JSON (of the step's stage: RoPE as trained) |
| `opt_state` | the optimizer state (sharded like the parameters) |
| `train` | JSON: step, stage, RNG key, non-finite counters, tokens seen |
| `data` | the Grain data iterator state (one file per process) |
| `recipe` | the resolved recipe as JSON |

Restores take targets with the *current* layout's shardings, so a run saved on one mesh goes on on another.
A latest step that cannot be read (never committed, missing files, an unreadable array) is skipped with a
warning, moved aside to `RUN_DIR/checkpoints-bad/`, and the newest readable committed step is used.
"""

from __future__ import annotations

import logging
import os
import shutil
import time

import orbax.checkpoint as ocp

log = logging.getLogger("glm5.train")

ITEMS = ("params", "config", "opt_state", "train", "data", "recipe")


class Checkpointer:
    def __init__(self, directory: str, max_to_keep: int | None, async_save: bool):
        self.directory = os.path.abspath(directory)
        self.max_to_keep, self.async_save = max_to_keep, async_save
        self.mngr = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True,
                                               enable_async_checkpointing=self.async_save,
                                               cleanup_tmp_directories=True)
        return ocp.CheckpointManager(self.directory, options=options)

    def committed_steps(self) -> list[int]:
        steps = ocp.utils.checkpoint_steps(self.directory) if os.path.isdir(self.directory) else []
        return sorted(s for s in steps if ocp.utils.is_checkpoint_finalized(os.path.join(self.directory, str(s))))

    def save(self, step: int, *, params, opt_state, train: dict, data_args, model_config: dict, recipe: dict):
        self.mngr.save(step, args=ocp.args.Composite(
            params=ocp.args.PyTreeSave(params), opt_state=ocp.args.PyTreeSave(opt_state),
            train=ocp.args.JsonSave(train), data=data_args, config=ocp.args.JsonSave(model_config),
            recipe=ocp.args.JsonSave(recipe)), force=True)
        if not self.async_save:
            self.mngr.wait_until_finished()

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()

    def restore_latest(self, params_target, opt_target, data_args_factory, warn=log.warning):
        """Restore the newest readable committed step: (step, params, opt_state, train dict), or None if the
        directory holds no step. Newer steps that fail to read are moved aside with a warning; if no step
        reads, nothing is moved and the newest step's error is raised (a wrong recipe, not a bad disk).

        `data_args_factory()` returns fresh Grain restore args (they restore into the iterator in place).
        """
        steps = self.committed_steps()
        failures = []
        for step in reversed(steps):
            missing = [i for i in ITEMS if not os.path.isdir(os.path.join(self.directory, str(step), i))]
            try:
                if missing:
                    raise ValueError(f"items missing: {', '.join(missing)}")
                out = self.mngr.restore(step, args=ocp.args.Composite(
                    params=ocp.args.PyTreeRestore(params_target, restore_args=_restore_args(params_target)),
                    opt_state=ocp.args.PyTreeRestore(opt_target, restore_args=_restore_args(opt_target)),
                    train=ocp.args.JsonRestore(), data=data_args_factory()))
            except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous step
                reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else e.__class__.__name__
                failures.append((step, reason, e))
                continue
            for bad, reason, _ in failures:
                self._set_aside(bad, f"unreadable ({reason})", step, warn)
            return step, out["params"], out["opt_state"], dict(out["train"])
        if failures:
            step, reason, e = failures[0]
            raise CheckpointReadError(f"{self.directory}: no checkpoint step could be restored; step {step}: "
                                      f"{reason}") from e
        return None

    def _set_aside(self, step: int, reason: str, using: int, warn):
        src = os.path.join(self.directory, str(step))
        dst = os.path.join(os.path.dirname(self.directory), "checkpoints-bad", f"{step}-{int(time.time())}")
        warn(f"checkpoint step {step} in {self.directory} is {reason}; moved to {dst}; "
             f"resuming from the previous committed step {using}")
        self.mngr.close()
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.exists(src):
            shutil.move(src, dst)
        self.mngr = self._open()


class CheckpointReadError(RuntimeError):
    """No step of a run's checkpoint directory could be restored."""


def _restore_args(target):
    return ocp.checkpoint_utils.construct_restore_args(target)
