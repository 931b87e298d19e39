"""The checkpoint part: the disk's own speed, then the project's checkpoint manager on the step's state.

- disk: `size` bytes of random data written with `os.write` in `block`-byte writes and `fsync`ed, in the
  checkpoint's directory (buffered rate: the writes alone; durable rate: writes + fsync), then read back
  after `posix_fadvise(DONTNEED)` has asked the kernel to drop the file's cached pages;
- save: `CheckpointManager.save` (glm5_jax/checkpoint/manager.py), with the trainer's own arguments
  (model variables, optimizer state, counters, data state, configs), synchronous (`async_save` off): the
  time to a committed step, in GB/s of the state's bytes (params + buffers + optimizer state, as held in
  memory), against the disk's durable write rate;
- restore: `CheckpointManager.restore_latest` of that step into the step's shardings, after the same
  page-cache drop over every file of the checkpoint;
- async stall: `save` with `async_save` on, as the training loop calls it: the time until it returns (the
  loop is blocked that long) as a fraction of the median step time, then the time until the write is done.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

import jax

from glm5_jax.bench.step import one_step
from glm5_jax.checkpoint.naming import nest


def _drop_cache(path: str):
    """Ask the kernel to drop the cached pages of `path` (a file, or every file below a directory)."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def disk_speed(directory: str, size: int = 1 << 30, block: int = 64 << 20) -> dict:
    """Sequential write (buffered, and with fsync) and read rates of `size` bytes in `directory`."""
    path = os.path.join(directory, f".glm5-bench-disk-{os.getpid()}")
    data = memoryview(os.urandom(min(block, size)))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t0, written = time.perf_counter(), 0
        while written < size:
            written += os.write(fd, data[:min(len(data), size - written)])
        t1 = time.perf_counter()
        os.fsync(fd)
        t2 = time.perf_counter()
    finally:
        os.close(fd)
    try:
        _drop_cache(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            t3, read = time.perf_counter(), 0
            while chunk := os.read(fd, block):
                read += len(chunk)
            t4 = time.perf_counter()
        finally:
            os.close(fd)
    finally:
        os.remove(path)
    return {"directory": os.path.abspath(directory), "bytes": size, "block_bytes": len(data),
            "write_buffered_bytes_per_s": size / (t1 - t0), "write_bytes_per_s": size / (t2 - t0),
            "fsync_s": t2 - t1, "read_bytes_per_s": read / (t4 - t3)}


def state_bytes(state) -> int:
    """Bytes of the step's state (params, buffers, optimizer state) as held in memory, all devices' shards
    of an array counted once (what a checkpoint stores)."""
    leaves = jax.tree.leaves((state.params, state.buffers, state.opt_state))
    return int(sum(x.nbytes for x in leaves if hasattr(x, "nbytes")))


def disk_bytes(directory: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)


def save(ckpt, step: int, bench, state, it):
    """The trainer's checkpoint (`run_state.save_state`) of `state` as step `step`."""
    from glm5_jax.train.run_state import save_state

    save_state(ckpt, dataclasses.replace(state, step=step), bench.stage, it, bench.recipe)


def save_once(bench, state, it, directory: str):
    """One synchronous save (step 1) of the state into `directory`: a checkpoint to convert, untimed."""
    ckpt = _manager(directory, bench.recipe.checkpoint, async_save=False)
    try:
        save(ckpt, 1, bench, state, it)
    finally:
        ckpt.close()


def _manager(directory: str, policy, async_save: bool):
    from glm5_jax.checkpoint.manager import CheckpointManager
    from glm5_jax.train.run_state import ITEMS

    return CheckpointManager(directory, dataclasses.replace(policy, async_save=async_save), ITEMS)


def sync_save_restore(bench, state, it, directory: str, repeats: int, out) -> dict:
    """Synchronous saves of the state (steps 1..repeats), then a restore of the last into the step's layout."""
    policy = bench.recipe.checkpoint
    ckpt = _manager(directory, policy, async_save=False)
    try:
        times = []
        for step in range(1, repeats + 1):
            out(f"  synchronous save {step}/{repeats}")
            t0 = time.perf_counter()
            save(ckpt, step, bench, state, it)
            times.append(time.perf_counter() - t0)
    finally:
        ckpt.close()
    on_disk = disk_bytes(os.path.join(directory, str(repeats)))
    _drop_cache(directory)
    params_abs, buffers_abs, opt_abs, *_ = bench.program.abstract_args()
    out("  restore of the last step (page cache dropped)")
    ckpt = _manager(directory, policy, async_save=False)
    try:
        t0 = time.perf_counter()
        step, restored, _ = ckpt.restore_latest({"params": nest({**params_abs, **buffers_abs}), "opt_state": opt_abs})
        jax.block_until_ready((restored["params"], restored["opt_state"]))
        restore_s = time.perf_counter() - t0
    finally:
        ckpt.close()
    if step != repeats:
        raise RuntimeError(f"restored step {step}, expected {repeats}")
    return {"save_times_s": times, "save_s": statistics.median(times), "restore_s": restore_s,
            "disk_bytes": on_disk}




def async_stall(bench, state, it, directory: str, repeats: int, step_batch, out) -> dict:
    """Asynchronous saves as the training loop makes them: how long `save` blocks, how long the write takes,
    and (given `step_batch`: a (batch, count) of the compiled step) one step's time while the write runs."""
    ckpt = _manager(directory, bench.recipe.checkpoint, async_save=True)
    stalls, totals, during = [], [], []
    try:
        for step in range(1, repeats + 1):
            out(f"  asynchronous save {step}/{repeats}")
            t0 = time.perf_counter()
            save(ckpt, step, bench, state, it)
            stalls.append(time.perf_counter() - t0)
            if step_batch is not None:
                during.append(one_step(bench, state, *step_batch, step)[0])
            ckpt.mngr.wait_until_finished()
            totals.append(time.perf_counter() - t0)
    finally:
        ckpt.close()
    return {"stall_times_s": stalls, "stall_s": statistics.median(stalls), "async_total_times_s": totals,
            "step_during_save_times_s": during}


def measure(bench, state, it, work_dir: str, disk_size: int, step_batch, step_median: float | None,
            out, repeats: int = 2) -> tuple[dict, dict, str]:
    """({disk}, {checkpoint}, directory of the synchronous checkpoint) for the state in `work_dir`."""
    out(f"disk: writing {disk_size / 1e9:.2f} GB in {work_dir}")
    disk = disk_speed(work_dir, disk_size)
    nbytes = state_bytes(state)
    out(f"checkpoint of {nbytes / 1e9:.3f} GB (params + buffers + optimizer state)")
    sync_dir = os.path.join(work_dir, "checkpoints-sync")
    result = {"state_bytes": nbytes, **sync_save_restore(bench, state, it, sync_dir, repeats, out)}
    result.update(async_stall(bench, state, it, os.path.join(work_dir, "checkpoints-async"), repeats, step_batch,
                              out))
    result["save_bytes_per_s"] = nbytes / result["save_s"]
    result["restore_bytes_per_s"] = nbytes / result["restore_s"]
    result["save_of_disk_write"] = result["save_bytes_per_s"] / disk["write_bytes_per_s"]
    result["restore_of_disk_read"] = result["restore_bytes_per_s"] / disk["read_bytes_per_s"]
    result["stall_of_step"] = None if step_median is None else result["stall_s"] / step_median
    return disk, result, sync_dir
