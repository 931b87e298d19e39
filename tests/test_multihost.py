"""Multi-host training with real processes on this machine: N processes x M simulated CPU devices (gloo
collectives) train exactly like one process x N*M devices, checkpoints move between process counts, and
faults (a killed peer, SIGTERM on one host, a bad coordinator, a wrong process count) end cleanly.

The runs are few and short (the 2-layer test model, 32-token rows, 6 steps) and share one XLA cache; the
2-process run writes the checkpoint the restore, export and fault tests start from."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from glm5_jax.launch.local import child_env as process_env
from glm5_jax.launch.local import free_port
from tests import train_util as u
from tests.conftest import run_cli

STEPS = 6
PP = {"mesh": {"pipeline": 2, "expert": 2, "tensor": 2}, "microbatches": 2}  # pipeline and expert axes
DT = {"mesh": {"data": 4, "tensor": 2}}  # data x tensor
# Both MoE layers (the pipeline splits them over its 2 stages); the data read as 4 shards in every run, so
# one process reads all four and four processes one each (data/shards.py).
BASE = ["model_overrides.first_k_dense_replace=0", "data_shards=4", f"max_steps={STEPS}",
        "checkpoint.interval_steps=2", "distributed.peer_timeout=5", "distributed.init_timeout=60"]


def _overrides(layout):
    mesh = ", ".join(f"{k}: {v}" for k, v in layout["mesh"].items())
    extra = f", microbatches: {layout['microbatches']}" if "microbatches" in layout else ""
    return [f"layout_overrides={{mesh: {{{mesh}}}{extra}}}"]


def launch(processes, devices, recipe, run_dir, layout, *overrides, timeout=420):
    """`glm5 launch local` of `glm5 train`: (exit status, output)."""
    cmd = [sys.executable, "-m", "glm5_jax.cli", "launch", "local", "--processes", str(processes),
           "--devices-per-process", str(devices), "--", "train", "--config", recipe, f"run_dir={run_dir}",
           *BASE, *_overrides(layout), *overrides]
    proc = subprocess.run(cmd, env=u.child_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout


def start_process(i, n, port, recipe, run_dir, layout, *overrides, devices=4, **env):
    """One process of an n-process job started by hand, as a user would (JAX_* variables)."""
    cmd = [sys.executable, "-m", "glm5_jax.cli", "train", "--config", recipe, f"run_dir={run_dir}", *BASE,
           *_overrides(layout), *overrides]
    return subprocess.Popen(cmd, env={**process_env(os.environ, i, n, devices, port), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def assert_same_losses(a: dict, b: dict, steps, rtol=1e-5):
    for s in steps:
        assert abs(a[s] - b[s]) <= rtol * abs(b[s]), (s, a[s], b[s])


def max_param_error(a_dir, b_dir, step) -> float:
    a, b = u.params(a_dir, step), u.params(b_dir, step)
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    return u.write_recipe(tmp_path_factory.mktemp("mh") / "recipe.yaml")


@pytest.fixture(scope="module")
def pp_runs(recipe, tmp_path_factory):
    """The pipeline x expert x tensor layout: 1 process x 8 devices, and 2 processes x 4 devices."""
    root = tmp_path_factory.mktemp("pp")
    one, two = root / "one", root / "two"
    code, out = u.run(recipe, one, *BASE, *_overrides(PP), timeout=420)
    assert code == 0, out
    code, out2 = launch(2, 4, recipe, two, PP)
    assert code == 0, out2
    return str(one), str(two), out2


def test_2x4_trains_like_1x8_on_pipeline_and_expert_axes(pp_runs):
    one, two, out = pp_runs
    assert_same_losses(u.losses(two), u.losses(one), range(1, STEPS + 1))
    assert max_param_error(two, one, STEPS) < 1e-5
    # Only process 0 prints progress and writes metrics; the checkpoint holds every step's data state.
    assert "[0] step      1" in out and "[1] step" not in out, out
    assert len(u.records(two)) == STEPS
    assert u.committed(two) == [2, 4, 6]


def test_4x2_trains_like_1x8_on_data_and_tensor_axes(recipe, tmp_path):
    one, four = tmp_path / "one", tmp_path / "four"
    small = ["max_steps=3", "model_overrides.num_hidden_layers=1", "model_overrides.first_k_dense_replace=1"]
    code, out = u.run(recipe, one, *BASE, *_overrides(DT), *small, timeout=420)
    assert code == 0, out
    code, out = launch(4, 2, recipe, four, DT, *small)
    assert code == 0, out
    # Each process reads its own one of the four shards (disjoint records, data/shards.py).
    assert "data in 4 shards, this process reads [0]" in out, out
    assert_same_losses(u.losses(four), u.losses(one), range(1, 4))
    assert max_param_error(four, one, 3) < 1e-5


def _resume_copy(src, dst, step):
    """The run directory as it was right after `step` was committed."""
    shutil.copytree(src, dst)
    for s in u.committed(dst):
        if s > step:
            shutil.rmtree(os.path.join(dst, "checkpoints", str(s)))


def test_checkpoint_of_2_processes_restores_in_1_and_in_4_and_exports(pp_runs, recipe, tmp_path):
    _, two, _ = pp_runs
    ref = u.losses(two)
    one = tmp_path / "one"
    _resume_copy(two, one, 2)
    code, out = u.run(recipe, one, *BASE, *_overrides(PP), timeout=420)
    assert code == 0 and "resumed from" in out and "step 2" in out, out
    assert_same_losses(u.losses(one), ref, range(3, STEPS + 1))
    four = tmp_path / "four"
    _resume_copy(two, four, 4)
    code, out = launch(4, 2, recipe, four, PP)  # 4 processes hold the 2-process job's shards
    assert code == 0 and "resumed from" in out, out
    assert_same_losses(u.losses(four), ref, range(5, STEPS + 1))
    hf = tmp_path / "hf"
    assert run_cli("convert", "orbax-to-hf", "--checkpoint", os.path.join(two, "checkpoints"), "--out", hf,
                   "--dtype", "float32", "-q") == 0
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    params = u.params(two, STEPS)
    np.testing.assert_array_equal(model.model.embed_tokens.weight.detach().numpy(), params["embed_tokens"])


def test_kill9_of_one_process_stops_the_other_and_relaunch_resumes(pp_runs, recipe, tmp_path):
    _, two, _ = pp_runs
    run_dir, port = tmp_path / "run", free_port()
    procs = [start_process(i, 2, port, recipe, run_dir, PP) for i in range(2)]
    try:
        u.wait_for_step(procs[0], run_dir, 3, timeout=300)
        procs[1].kill()
        killed = time.monotonic()
        out, _ = procs[0].communicate(timeout=60)
        stopped = time.monotonic() - killed
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0, out
    assert "lost process 1 of 2" in out and "distributed.peer_timeout 5 s" in out, out
    assert stopped < 5 + 10, stopped  # the peer timeout, a monitor interval, and exit
    print(f"kill -9 of process 1: process 0 stopped {stopped:.1f} s later")
    last = u.committed(run_dir)[-1]
    code, out = launch(2, 4, recipe, run_dir, PP)
    assert code == 0 and f"resumed from {run_dir / 'checkpoints'} step {last}" in out, out
    assert_same_losses(u.losses(run_dir), u.losses(two), range(1, STEPS + 1))


def test_sigterm_to_one_process_saves_the_same_step_everywhere(recipe, pp_runs, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    procs = [start_process(i, 2, port, recipe, run_dir, PP, "max_steps=12") for i in range(2)]
    try:
        u.wait_for_step(procs[0], run_dir, 2, timeout=300)
        procs[1].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    line = next(ln for ln in outs[0].splitlines() if ln.startswith("SIGTERM (on some process): saving step"))
    step = int(line.split("saving step ")[1].split()[0])
    assert 2 <= step < 12 and u.committed(run_dir)[-1] == step, (outs, u.committed(run_dir))
    assert u.train_state(run_dir, step)["step"] == step


def _one_process(i, n, port, recipe, run_dir, *overrides, timeout=120):
    start = time.monotonic()
    p = start_process(i, n, port, recipe, run_dir, PP, "distributed.init_timeout=5", *overrides)
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out, time.monotonic() - start


def test_bad_coordinator_and_wrong_process_count_are_one_line(recipe, tmp_path):
    # Process 1 of 2, nobody listening at the coordinator's address.
    code, out, took = _one_process(1, 2, free_port(), recipe, tmp_path / "a")
    assert code == 2 and "not reachable within 5 s" in out, out
    assert len([ln for ln in out.splitlines() if "error" in ln.lower()]) == 1, out
    # Process 0 of 2 waits for a second process that never comes.
    code, out, took0 = _one_process(0, 2, free_port(), recipe, tmp_path / "b")
    assert code == 2 and "the job did not form within 5 s" in out, out
    assert len([ln for ln in out.splitlines() if "error" in ln.lower()]) == 1, out
    print(f"bad coordinator: exit after {took:.1f} s; missing process: exit after {took0:.1f} s (init_timeout 5 s)")
    assert took < 60 and took0 < 60
    # Two processes that disagree about the count.
    port = free_port()
    procs = [start_process(0, 2, port, recipe, tmp_path / "c", PP),
             start_process(1, 2, port, recipe, tmp_path / "c", PP, JAX_NUM_PROCESSES="3")]
    # (each waits for the other up to init_timeout 60 s after starting JAX: minutes on a loaded 2-core machine)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert all("process count: the processes disagree (process 0: 2, process 1: 3" in o for o in outs), outs


# ----- process discovery and the local launcher (no training) -----

from glm5_jax.errors import DistributedError  # noqa: E402
from glm5_jax.train.distributed import discover, first_host  # noqa: E402


@pytest.mark.parametrize("env, want", [
    ({}, None),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"},
     ("h0:1234", 4, 3, "JAX_* variables")),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "gpu[07-10],cpu1"},
     ("gpu07:8476", 4, 2, "SLURM")),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "gpu07"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "JAX_COORDINATOR_PORT": "9000",
      "OMPI_MCA_orte_hnp_uri": "4014080000.0;tcp://node3,10.0.0.3:41507"}, ("node3:9000", 2, 1, "Open MPI")),
    ({"JOB_COMPLETION_INDEX": "5", "JAX_NUM_PROCESSES": "8", "JAX_COORDINATOR_ADDRESS": "glm5-workers-0-0.glm5:8476"},
     ("glm5-workers-0-0.glm5:8476", 8, 5, "Kubernetes indexed job")),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "1"}, ("t0:8476", 4, 1, "Cloud TPU VM")),
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "n1",
      "JAX_PROCESS_ID": "0"}, ("n1:8476", 4, 0, "SLURM")),  # an explicit variable wins
])
def test_discover(env, want):
    launch = discover(env)
    got = None if launch is None else (launch.coordinator, launch.num_processes, launch.process_id, launch.source)
    assert got == want


@pytest.mark.parametrize("env, message", [
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_PROCESS_ID": "0"}, "JAX_NUM_PROCESSES: not set"),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "process id 2 / process count 2"),
    ({"JAX_COORDINATOR_ADDRESS": "h0", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "must be HOST:PORT"),
    ({"JAX_COORDINATOR_ADDRESS": "h0:1", "JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"},
     "JAX_NUM_PROCESSES='two'"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "set JAX_COORDINATOR_ADDRESS"),
    ({"GLM5_DISTRIBUTED": "yes"}, "GLM5_DISTRIBUTED='yes': the only value is auto"),
])
def test_discover_errors_name_the_variable(env, message):
    with pytest.raises(DistributedError, match=message.replace("(", r"\(").replace("[", r"\[")):
        discover(env)


def test_first_host_of_slurm_node_lists():
    assert [first_host(x) for x in ("a1", "gpu[03-06,09]", "gpu[3],b", "x-[10-12]")] == ["a1", "gpu03", "gpu3", "x-10"]


def test_launch_local_prefixes_output_and_fails_when_a_process_fails(tmp_path):
    cmd = [sys.executable, "-m", "glm5_jax.cli", "launch", "local", "--processes", "2", "--", "train", "--config",
           str(tmp_path / "missing.yaml")]
    proc = subprocess.run(cmd, env=u.child_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert "[0] glm5: error:" in proc.stdout and "[1] glm5: error:" in proc.stdout, proc.stdout
    assert re.search(r"glm5 launch: process [01] of 2 exited with status 2", proc.stdout), proc.stdout
    bad = subprocess.run([sys.executable, "-m", "glm5_jax.cli", "launch", "local", "--processes", "0", "--", "train"],
                         env=u.child_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout.strip().splitlines() == [
        "glm5: error: --processes: must be a positive integer; got 0"], bad.stdout


# ----- data shards (in this process: no training) -----

def test_data_shards_are_disjoint_cover_the_data_and_resume_exactly_per_process(tmp_path):
    import json as json_lib

    import jax

    from glm5_jax.data import shards as S
    from glm5_jax.data.loader import DataPipeline
    from tests.test_data_loader import make_docs, stream_docs, two_stage_config, write_jsonl

    docs = make_docs(60)
    cfg = two_stage_config([write_jsonl(tmp_path / "a.jsonl", docs)])
    pipe = DataPipeline(cfg, 0, 1)
    # Two "processes" reading one shard each, and one process reading both: the same blocks.
    alone = [S.ShardedIterator(pipe, 2, [k]) for k in range(2)]
    both = S.ShardedIterator(pipe, 2, [0, 1])
    steps = [[next(it) for _ in range(18)] for it in alone]
    together = [next(both) for _ in range(18)]
    for s in range(18):
        for k in range(2):
            for key, v in together[s][k].items():
                np.testing.assert_array_equal(v, steps[k][s][k][key])
    # The shards' documents are disjoint and together cover the data (the first epoch of each).
    seen = [set(stream_docs([b[k] for b in steps[k]])[:len(docs) // 2]) for k in range(2)]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(docs)
    # Resume: the saved document of every shard's state restores each process (or one for both) exactly.
    doc = json_lib.loads(json_lib.dumps(S.state_document(2, {**alone[0].local_state(), **alone[1].local_state()})))
    assert doc["shards"] == 2 and set(doc["states"]) == {"0", "1"}
    later = [[next(it) for _ in range(3)] for it in alone]
    for k in range(2):
        resumed = S.ShardedIterator(pipe, 2, [k], states=doc["states"])
        for a, b in zip([next(resumed) for _ in range(3)], later[k]):
            np.testing.assert_array_equal(a[k]["input_ids"], b[k]["input_ids"])
        resumed.close()
    one = S.ShardedIterator(pipe, 2, [0, 1], states=doc["states"])
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("d",))
    batch, count = S.place(next(one), ["input_ids"], jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, "d")), 1, 4, 32, 2)
    assert count == 1
    np.testing.assert_array_equal(np.asarray(batch["input_ids"])[0],
                                  np.concatenate([later[0][0][0]["input_ids"], later[1][0][1]["input_ids"]]))
    for it in (*alone, both, one):
        it.close()
    with pytest.raises(Exception, match="no shard 1"):
        S.ShardedIterator(pipe, 2, [1], states={"0": doc["states"]["0"]})
