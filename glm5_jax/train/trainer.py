"""`glm5 train`: a recipe's stages, step after step, with checkpoints, evaluation and metrics.

`resolve` (train/setup.py) turns the recipe into per-stage settings, checked against the layout; the
checkpoint manager restores the run or initialises it and decides when to save; `TrainStep` (train/step.py)
is the compiled program, one per stage shape. The loop below only moves data and state between them.

The host runs one step ahead of the device: it dispatches step s, reads step s-1's metrics (computed by
then), and puts step s+1's batch on the devices while step s computes, so input loading overlaps compute and
the non-finite guard still stops the run within one step.

Several processes (docs/multihost.md) run this same loop: each reads its own data shards (train/feed.py), the
step's values are global arrays, process 0 alone prints and writes metrics, every process takes part in
every save and restore, and the decisions taken from host state (SIGTERM, time-based saves) are agreed once
per step (train/agree.py); a lost peer ends the others within `distributed.peer_timeout` (train/peers.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import sys
import threading
import time

import jax

from glm5_jax.accounting.analytic import model_flops_per_step
from glm5_jax.accounting.peak import device_peak
from glm5_jax.checkpoint.manager import CheckpointManager
from glm5_jax.checkpoint.outputs import check_output
from glm5_jax.errors import TrainingStopped
from glm5_jax.rl.evaluate import RLEvaluator
from glm5_jax.rl.setup import with_rl
from glm5_jax.train import step as S
from glm5_jax.train.agree import agree
from glm5_jax.train.distributed import maybe_initialize_distributed
from glm5_jax.train.evaluate import Evaluator
from glm5_jax.train.feed import feed_opener
from glm5_jax.train.metrics import MetricsLog
from glm5_jax.train.peers import PeerMonitor, barrier
from glm5_jax.train.recipe import Recipe
from glm5_jax.train.run_state import open_checkpoints, restore_or_init, save_state
from glm5_jax.train.setup import Run, StageSettings, resolve


class CompileInterrupted(Exception):
    """SIGTERM arrived while a step was compiling (the loop saves and stops without waiting for it)."""


class Programs:
    """The compiled train step of each distinct stage shape (stages that share one share the program)."""

    def __init__(self, run: Run, abstract, out, stop=lambda: False, sync=lambda name: None):
        self.run, self.abstract, self.out, self.stop, self.sync = run, abstract, out, stop, sync
        self.tx = None  # the run's optimizer, made with the first program and shared by the others
        self._built: dict = {}

    def __len__(self) -> int:
        return len(self._built)

    def built(self, stage: StageSettings) -> bool:
        return repr(stage.step) in self._built

    def make(self, stage: StageSettings) -> S.TrainStep:
        """The stage's train step, not compiled (`build_step` with the run's shared abstract state and optimizer)."""
        program = S.build_step(self.run, stage, self.abstract, self.tx)
        self.tx = program.tx
        return program

    def get(self, stage: StageSettings) -> S.TrainStep:
        key = repr(stage.step)  # (the configs are plain dataclasses, equal when their reprs are)
        if key not in self._built:
            program = self.make(stage)
            a, r, L = stage.step.batch_shape
            self._compile(program, f"compiling the {L}-token step ({a} x {r} rows) of stage {stage.name}")
            self.sync(f"compiled-{len(self._built)}")  # every process runs its first step together
            self._built[key] = program
        return self._built[key]

    def _compile(self, program: S.TrainStep, what: str, every: float = 20.0):
        """Compile in a worker thread while this one reports progress every `every` s and watches `stop()`:
        XLA's compiler does not return to Python for minutes, so a signal could not be handled before."""
        start, errors = time.monotonic(), []

        def work():
            try:
                program.compile()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
                errors.append(e)
        worker = threading.Thread(target=work, daemon=True, name="compile")
        self.out(f"{what} ...")
        worker.start()
        next_report = start + every
        while worker.is_alive():
            worker.join(0.2)
            if self.stop():
                raise CompileInterrupted(what)
            if time.monotonic() >= next_report:
                self.out(f"  ... still compiling ({time.monotonic() - start:.0f} s)")
                next_report += every
        if errors:
            raise errors[0]
        self.out(f"  compiled in {time.monotonic() - start:.1f} s")


def _setup_cache(recipe: Recipe):
    if recipe.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(recipe.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


class Reporter:
    """Reads each step's metrics one step late (`add` queues step s and reports step s-1), keeps the
    counters of the train state, logs, and stops the run after too many non-finite steps in a row."""

    def __init__(self, run: Run, log: MetricsLog, counters: dict, end: int, last_saved, programs: Programs,
                 resumed: bool = False):
        self.run, self.log, self.counters, self.end = run, log, counters, end
        self.last_saved, self.programs = last_saved, programs
        device = run.par.mesh.devices.flat[0]
        self.devices = run.par.mesh.devices.size
        self.peak = device_peak(run.recipe.metrics.peak_flops, device)
        self.pending, self.done_at = [], 0.0
        self.first_step: int | None = None
        self.resumed = resumed  # (this run restored a checkpoint: its first record says from which step)
        self.losses: dict = {}
        self.first_loss = self.last_loss = None

    def add(self, step: int, stage: StageSettings, lr: float, rows: int, metrics, dispatched: float,
            host: dict | None = None):
        """Queue step `step`'s device metrics (and the feed's host-side ones, e.g. an RL rollout's rewards)."""
        self.flush()
        self.first_step = step if self.first_step is None else self.first_step
        self.pending.append((step, stage, lr, rows, metrics, dispatched, host or {}))

    def flush(self):
        while self.pending:
            self._report(*self.pending.pop(0))

    def _report(self, step, stage, lr, rows, m, dispatched, host):
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, self.done_at = now - max(dispatched, self.done_at), now  # steps overlap: the interval between results
        c, recipe = self.counters, self.run.recipe
        tokens = rows * stage.data.seq_len
        c["tokens_seen"] += tokens
        loss = float(m["loss"])
        if bool(m["finite"]):
            c["nonfinite_in_a_row"] = 0
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss
        else:
            c["nonfinite_in_a_row"] += 1
            c["skipped_total"] += 1
            self.log.line(f"step {step}: non-finite loss {loss} / grad norm {float(m['grad_norm'])}; update "
                          f"skipped ({c['nonfinite_in_a_row']} in a row)")
        self.log.advance(step, stage.name, loss)
        if step % recipe.metrics.interval == 0 or step in (self.first_step, stage.data.start_step + 1, self.end):
            program = self.programs.get(stage)
            flops = model_flops_per_step(stage.step.model_cfg, self.run.par, rows, stage.data.seq_len,
                                         program.depths, stage.step.loss_cfg.dsa)
            objective = program.objective
            self.log.write({"step": step, "stage": stage.name, "loss": loss, "grad_norm": float(m["grad_norm"]),
                            "lr": lr, "tokens": int(m["tokens"]), "rows": rows, "tokens_per_s": tokens / dt,
                            "mfu": flops / dt / (self.peak * self.devices), "step_time": dt,
                            "skipped": c["skipped_total"],
                            # The first step this process trained after restoring a checkpoint (plots mark it).
                            **({"resumed_from": step - 1} if step == self.first_step and self.resumed else {}),
                            **{k: float(m[k]) for k in objective.metric_names + objective.step_metric_names
                               if k in m}, **host})
            self.losses[step] = loss
        n = c["nonfinite_in_a_row"]
        if n >= recipe.max_nonfinite_in_a_row:
            last = f"(step {self.last_saved()}) " if self.last_saved() is not None else ""
            raise TrainingStopped(f"{n} non-finite steps in a row (steps {step - n + 1}..{step}, max_nonfinite_in_"
                                  f"a_row {recipe.max_nonfinite_in_a_row}); stopped without saving: the last "
                                  f"checkpoint {last}is intact")


def in_starting_layout(run: Run, checkpoints: str) -> Run:
    """`run` in the layout of the stage it starts in: that of its newest committed checkpoint's step, or of
    `start_stage` when that lies ahead. One `glm5 train` trains in one layout; it saves and stops at the
    first stage of another, and the same command run again continues there in that stage's layout."""
    steps = CheckpointManager.committed_in(checkpoints)
    start = run.start_step
    return dataclasses.replace(run, par=run.stage_at(max(steps[-1] if steps else 0, start)).par)


def layout_end(run: Run, step: int) -> int:
    """The first step at or after `step` whose stage runs in another layout than the run (else its end)."""
    later = [s for s in run.stages if s.data.end_step > step and s.par is not run.par]
    return later[0].data.start_step if later else run.total_steps


def train(recipe: Recipe, out=print) -> dict:
    """Run `recipe` to its end (or max_steps / SIGTERM). Returns a summary dict (final step, losses, ...)."""
    run_dir = check_output(recipe.run_dir, "run_dir", directory=True, inside=True)
    _setup_cache(recipe)
    launch = maybe_initialize_distributed(recipe.distributed.init_timeout, recipe.distributed.peer_timeout)
    out = _process_output(out)
    if launch is not None:
        out(f"{jax.process_count()} processes ({launch.source}), {jax.local_device_count()} devices each")
    run = with_rl(in_starting_layout(resolve(recipe), os.path.join(os.path.abspath(recipe.run_dir), "checkpoints")))
    open_feed = feed_opener(run, out)
    evaluator = None
    if recipe.eval.enabled:  # (an RL run's held-out figures are rewards, a data run's losses)
        evaluator = RLEvaluator(run) if run.rl is not None else Evaluator(run)
    abstract = S.abstract_state(run.model_cfg, recipe.seed)
    programs = Programs(run, abstract, out)
    created = not os.path.exists(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    progress = {"trained": False}
    try:
        with contextlib.ExitStack() as stack:
            ckpt = open_checkpoints(recipe, os.path.join(run_dir, "checkpoints"))
            stack.callback(ckpt.close)
            monitor = PeerMonitor(recipe.distributed.peer_timeout, lambda: (ckpt.committed_steps() or [None])[-1])
            stack.callback(monitor.done)  # (runs before ckpt.close: a peer still saving does not count it lost)
            monitor.start()
            try:
                return _run(run, open_feed, programs, abstract, ckpt, evaluator, run_dir, stack, progress, out)
            except jax.errors.JaxRuntimeError:
                monitor.explain()  # a collective failed: a lost peer is the likely cause, and gets its line
                raise
    except BaseException:
        if created and not progress["trained"] and jax.process_index() == 0:
            shutil.rmtree(run_dir, ignore_errors=True)  # a start that failed before its first step leaves nothing
        raise


def _process_output(out):
    """Process 0 prints as asked; the others print only warnings, and every log line names its process."""
    if jax.process_count() == 1:
        return out
    tag = f"[process {jax.process_index()}/{jax.process_count()}] "
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(tag + "%(levelname)s %(message)s"))
    if jax.process_index() == 0:
        return out
    return lambda line: print(tag + line, file=sys.stderr, flush=True) if line.startswith("WARNING") else None


def _run(run: Run, open_feed, programs: Programs, abstract, ckpt: CheckpointManager, evaluator,
         run_dir: str, stack: contextlib.ExitStack, progress: dict, out) -> dict:
    """The loop of `train`, from restore-or-init to the last save; `stack` closes what it opens."""
    recipe = run.recipe
    total = run.total_steps
    end = total if recipe.max_steps is None else min(total, recipe.max_steps)
    state, it = restore_or_init(run, ckpt, programs.make(run.stages[0]), open_feed, out)
    stack.callback(it.close)
    if run.stage_at(state.step).par is not run.par:  # (an older checkpoint than the newest was restored)
        raise TrainingStopped(f"step {state.step} (stage {run.stage_at(state.step).name}) runs in another layout "
                              f"than this run's {dict(run.par.mesh.shape)}: run the same command again (the "
                              "newer, unreadable checkpoint was set aside)")
    switch = layout_end(run, state.step)
    if switch < end:
        end = switch
        out(f"stage {run.stage_at(end).name} runs in another layout: this run trains to step {end}, saves and "
            "stops; run the same command again to continue in that layout")
    if evaluator is not None:
        evaluator.shards = it.shards
    primary = jax.process_index() == 0
    log = MetricsLog(run_dir, state.step, recipe.metrics.tensorboard, recipe.metrics.progress, end, primary)
    stack.callback(log.close)
    reporter = Reporter(run, log, state.counters, end, lambda: ckpt.last_saved, programs,
                        resumed=ckpt.last_saved is not None)
    multi = jax.process_count() > 1
    # Several processes: a SIGTERM during a compile waits for the compile (the stop is agreed after the step).
    programs.stop = (lambda: False) if multi else (lambda: ckpt.sigterm)
    programs.sync = lambda name: barrier(name, recipe.distributed.init_timeout)
    start, stopped = state.step, None
    out(f"training from step {start} to {end} of {total} on {run.par.mesh.devices.size} "
        f"{run.par.mesh.devices.flat[0].platform} devices, mesh {dict(run.par.mesh.shape)}; run dir {run_dir}"
        + (f"; data in {it.shards} shards, this process reads {it.indices}" if multi or it.shards > 1 else ""))

    def save():
        reporter.flush()  # the counters saved are this step's
        save_state(ckpt, state, run.stage_at(max(state.step - 1, 0)), it, recipe)  # (the last step's stage: RoPE)

    if evaluator is not None and recipe.eval.at_start and ckpt.last_saved is None and state.step == run.start_step:
        first = run.stage_at(state.step)  # (a fresh run: its held-out figures before any training)
        log.write_eval({"step": state.step, "stage": first.name,
                        **evaluator.run_at(first, programs.get(first), state.params, state.buffers)})
    with ckpt.watch_sigterm():
        batch, current = None, None
        while state.step < end:
            stage = run.stage_at(state.step)
            if stage is not current:
                out(stage.describe())
                current = stage
            try:
                program = programs.get(stage)  # (before this step's batch is read: a stop here saves exactly)
            except CompileInterrupted:
                out(f"SIGTERM while compiling: saving step {state.step} and exiting")
                if ckpt.last_saved != state.step:
                    save()
                stopped = "sigterm-compiling"  # (the compile thread still runs: `glm5 train` exits without teardown)
                break
            data, count = batch or it.next_batch(stage, state)
            if it.reset_optimizer:  # (asynchronous RL after a weight push: rl.asynchronous.reset_optimizer)
                state.opt_state, it.reset_optimizer = program.init_optimizer(state.params), False
            lr = float(stage.schedule(state.step - stage.data.start_step))
            dispatched = time.perf_counter()
            state.params, state.buffers, state.opt_state, metrics = program(
                state.params, state.buffers, state.opt_state, data, count, lr, stage.bias_rate)
            state.step += 1
            progress["trained"] = True
            reporter.add(state.step, stage, lr, count * stage.data.micro_rows, metrics, dispatched, it.report())
            stage_end = state.step == stage.data.end_step
            if evaluator is not None and evaluator.due(state.step, stage_end):
                reporter.flush()
                log.write_eval({"step": state.step, "stage": stage.name,
                                **evaluator.run_at(stage, program, state.params, state.buffers)})
            sigterm, due = agree(ckpt.sigterm, ckpt.due(state.step, stage_end and state.step < end))
            if sigterm:
                out(f"SIGTERM{' (on some process)' if multi else ''}: saving step {state.step} and exiting")
                save()
                stopped = "sigterm"
                break
            if due:
                save()
            # The next step's batch goes to the devices while this step computes (unless its program is yet to
            # compile: then it is read after the compile, so a SIGTERM during the compile saves this step exactly).
            following = run.stage_at(state.step)
            batch = (it.next_batch(following, state) if it.ahead and state.step < end and programs.built(following)
                     else None)
        reporter.flush()
        if (recipe.checkpoint.save_on_exit or state.step == switch) and ckpt.last_saved != state.step:
            save()
    first, last = reporter.first_loss, reporter.last_loss
    out(f"done: step {state.step}" + (f", loss {first:.4f} -> {last:.4f}" if first is not None else "")
        + (f", checkpoint step {ckpt.last_saved} in {ckpt.directory}" if ckpt.last_saved is not None else "")
        + f"; {len(programs)} train step program(s) compiled")
    return {"start_step": start, "end_step": state.step, "losses": reporter.losses, "stopped": stopped,
            "first_loss": first, "last_loss": last, "last_saved": ckpt.last_saved,
            "skipped": state.counters["skipped_total"], "programs": len(programs)}
