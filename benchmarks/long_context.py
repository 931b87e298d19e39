"""One GLM-5 attention layer at long context: compiled memory, FLOPs and wall time of forward + backward.

The layer has the released model's dimensions (64 heads of 192 + 64 / 256, kv_lora 512, q_lora 2048, indexer
32 x 128, top-k 2048, query block 256), batch 1, on one device. Paths:

- sparse:  DSA top-k attention (what training runs above 2,048 tokens);
- dense:   `dsa: dense` (pre- and mid-training before DSA): no indexer, attention over every visible key as
           the compile target runs it: the TPU splash kernel on a TPU target, else query x key blocks with
           an online softmax (glm5_jax/model/flash.py);
- blocked: `dsa: dense` with the blocked kernel on any target (what a TPU runs under context parallelism);
- warmup:  the DSA warm-up: dense attention in query blocks plus the indexer's KL against it.

For each length it prints XLA's compiled temporaries (the activation memory of the step), the analytic
FLOPs (XLA's cost analysis counts a loop body once), and, up to `--run-up-to`, the measured wall time of a
forward + backward. Then the fitted growth exponent of temporaries and FLOPs in L per path, and the length
from which sparse is faster than dense: the shortest timed one, or else extrapolated from fits to the timed
points (sparse linear in L, dense a power of L).

    .venv/bin/python benchmarks/long_context.py [--lengths 4096,8192,16384,32768,65536]
        [--compile-only 131072,202752] [--run-up-to 4096] [--dtype float32|bfloat16]
        [--paths sparse,dense,blocked,warmup]
        [--override attention_query_block=128] [--target cpu|tpu:v5p:2x2x1]

XLA:CPU computes bfloat16 matmuls in float32 and keeps the converted copies, so its bfloat16 temporaries
overstate what an accelerator needs; `--target tpu:...` compiles for a TPU with no TPU present (libtpu,
the `tpu` extra).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from glm5_jax import config
from glm5_jax.accounting.analytic import dense_pairs
from glm5_jax.model.flash import SPLASH_BLOCK, dense_kernel
from glm5_jax.model.mla import MLA
from glm5_jax.model.rope import inverse_frequencies, rope_angles
from glm5_jax.sharding.context import Parallelism, use
from glm5_jax.sharding.layout import ParallelConfig

PATHS = ("sparse", "dense", "blocked", "warmup")
MODES = {"sparse": "sparse", "dense": "dense", "blocked": "dense", "warmup": "warmup"}


def layer_config(dtype: str, overrides=()):
    return config.load("glm5-744b", [f"dtype={dtype}", f"param_dtype={dtype}", "num_hidden_layers=1",
                                     "first_k_dense_replace=1", "num_nextn_predict_layers=0", *overrides])


def objective(cfg, path: str):
    """loss(layer state, x) whose gradient is the layer's backward: a fixed projection of the output (plus the
    indexer KL in warm-up)."""
    def loss(state, x, graphdef, cos, sin, segments, probe):
        layer = nnx.merge(graphdef, state)
        out, _, kl = layer(x, cos, sin, segments, None, MODES[path])
        value = jnp.sum(out.astype(jnp.float32) * probe)
        return value + (kl if kl is not None else 0.0)
    return loss


def build(cfg, path: str, length: int, concrete: bool, device=None):
    """The jitted forward + backward and its arguments (shapes only unless `concrete`: nothing allocated;
    placed on `device` when given)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: MLA(cfg, has_indexer=True, stack=None, rngs=nnx.Rngs(0))))
    dt = jnp.dtype(cfg.dtype)

    def arguments():
        positions = jnp.arange(length, dtype=jnp.int32)[None]
        cos, sin = rope_angles(positions, inverse_frequencies(cfg.qk_rope_head_dim, cfg.rope_parameters), dt)
        kx, kp = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (1, length, cfg.hidden_size), dt)
        probe = jax.random.normal(kp, (1, length, cfg.hidden_size), jnp.float32)
        params = nnx.state(MLA(cfg, has_indexer=True, stack=None, rngs=nnx.Rngs(0)))
        return params, x, cos, sin, jnp.ones((1, length), jnp.int32), probe

    grads = jax.value_and_grad(objective(cfg, path), argnums=(0, 1))
    step = jax.jit(lambda state, x, *rest: grads(state, x, graphdef, *rest))
    if concrete:
        return step, arguments()
    args = jax.eval_shape(arguments)
    if device is not None:
        placed = SingleDeviceSharding(device)
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed), args)
    return step, args


def target_device(target: str):
    """None for this machine's CPU; else the first chip of TPU topology `tpu:NAME` (compile-only)."""
    if target == "cpu":
        return None
    if not target.startswith("tpu:"):
        raise SystemExit(f"--target: expected cpu or tpu:TOPOLOGY (e.g. tpu:v5p:2x2x1); got {target!r}")
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=target[4:]).devices[0]


def analytic_flops(cfg, path: str, L: int, kernel: str = "blocked") -> float:
    """Forward + backward FLOPs of the layer (backward = 2 x forward; a rematerialised query block's forward
    counted once more), matmuls only."""
    H, D = cfg.num_attention_heads, cfg.hidden_size
    nope, rope, v, C, Cq = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.q_lora_rank
    Hi, Di, K = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    proj = 2 * L * (D * Cq + Cq * H * (nope + rope) + D * (C + rope) + H * v * D)
    index_proj = 2 * L * (Cq * Hi * Di + D * Di + D * Hi)
    absorb = 2 * L * H * (nope * C + C * v)  # q into the latent, latent output to values
    if path in ("dense", "blocked"):  # forward, backward (2x) and the rematerialised query blocks' forward
        if path == "dense" and kernel == "splash":  # expanded heads over causal 128-wide tiles; kv_b expanded
            attn = 2 * dense_pairs(L, 1, SPLASH_BLOCK) * H * (nope + rope + v) + 2 * L * C * H * (nope + v)
            return 3 * (proj + attn)
        attn = 2 * dense_pairs(L, 1, cfg.attention_query_block) * H * (2 * C + rope) + absorb
        return 3 * proj + 4 * attn
    keys = K if path == "sparse" else L / 2
    attn = 2 * L * keys * H * (C + rope + C) + absorb
    index = 2 * L * (L / 2) * Hi * Di  # causal key blocks only (the indexer skips invisible ones)
    fwd = proj + index_proj + attn + index
    return fwd + 2 * (proj + index_proj + attn) + attn + (2 * index if path == "warmup" else 0)


def measure(cfg, path: str, length: int, run: bool, device=None):
    step, args = build(cfg, path, length, concrete=run, device=device)
    t0 = time.perf_counter()
    if device is not None and path != "blocked":  # a one-device layout on the target: the model sees its platform
        with use(Parallelism.create(ParallelConfig(mesh={"data": 1}), [device])):
            lowered = step.lower(*args)
    else:
        lowered = step.lower(*args)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    temps = compiled.memory_analysis().temp_size_in_bytes
    wall = None
    if run:
        jax.block_until_ready(compiled(*args))
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        wall = time.perf_counter() - t0
    return temps, compile_s, wall


def _libtpu_version() -> str:
    from importlib.metadata import version

    return version("libtpu")


def exponent(points):
    """Least-squares slope of log(value) against log(L)."""
    xs, ys = np.log([p[0] for p in points]), np.log([p[1] for p in points])
    return float(np.polyfit(xs, ys, 1)[0]) if len(points) > 1 else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,8192,16384,32768,65536")
    ap.add_argument("--compile-only", default="131072,202752", help="lengths compiled, never run")
    ap.add_argument("--run-up-to", type=int, default=4096, help="run (time) lengths up to this; 0: none")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                    help="model config override, e.g. attention_query_block=128 (repeatable)")
    ap.add_argument("--target", default="cpu", help="cpu (this machine), or tpu:TOPOLOGY (e.g. tpu:v5p:2x2x1): "
                    "compile only, with the TPU compiler of the installed libtpu on one chip of that topology")
    args = ap.parse_args()
    cfg = layer_config(args.dtype, args.override)
    device = target_device(args.target)
    if device is not None:
        args.run_up_to = 0
    lengths = [int(n) for n in args.lengths.split(",") if n]
    extra = [int(n) for n in args.compile_only.split(",") if n]
    paths = [p for p in args.paths.split(",") if p]
    for p in paths:
        if p not in PATHS:
            raise SystemExit(f"--paths: {p!r} is not one of {', '.join(PATHS)}")
    where = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores" if device is None else
             f"{args.target} ({device.device_kind}), compile only, libtpu {_libtpu_version()}")
    print(f"{where}, jax {jax.__version__}; one GLM-5 attention layer, batch 1, {args.dtype}, forward + backward")
    print(f"{'path':8} {'length':>8} {'temporaries':>13} {'FLOPs':>10} {'compile':>9} {'wall':>9}")
    results = {p: [] for p in paths}
    for path in paths:
        for length in lengths + extra:
            temps, compile_s, wall = measure(cfg, path, length, length in lengths and length <= args.run_up_to,
                                             device)
            platform = "cpu" if device is None or path == "blocked" else device.platform
            kernel = dense_kernel(platform, 1, length, (cfg.qk_head_dim, cfg.v_head_dim))
            flops = analytic_flops(cfg, path, length, kernel)
            results[path].append((length, temps, flops, wall))
            wall_s = "-" if wall is None else f"{wall:.2f} s"
            print(f"{path:8} {length:>8} {temps / 1e9:>10.2f} GB {flops:>10.2e} {compile_s:>7.1f} s {wall_s:>9}",
                  flush=True)
    print()
    for path, rows in results.items():
        print(f"{path}: temporaries grow as L^{exponent([(r[0], r[1]) for r in rows]):.2f}, "
              f"FLOPs as L^{exponent([(r[0], r[2]) for r in rows]):.2f}")
    if "sparse" in results and "dense" in results:
        sparse = [(r[0], r[3]) for r in results["sparse"] if r[3] is not None]
        dense = [(r[0], r[3]) for r in results["dense"] if r[3] is not None]
        print(crossover(sparse, dense))


def crossover(sparse, dense) -> str:
    """Where sparse gets faster than dense, from (length, wall seconds) points: the shortest timed length, or
    else extrapolated from fits to the timed points (sparse linear in L, dense a power of L)."""
    timed = dict(dense)
    faster = [n for n, t in sparse if n in timed and t < timed[n]]
    if faster:
        return f"sparse is faster than dense from L = {min(faster)} (timed)"
    if len(sparse) < 2 or len(dense) < 2:
        return "sparse is faster than dense: not within the timed lengths (time two or more lengths to extrapolate)"
    b, a = np.polyfit([n for n, _ in sparse], [t for _, t in sparse], 1)
    p = exponent(dense)
    n0, t0 = dense[-1]
    for n in range(max(n for n, _ in sparse), 1 << 22, 256):
        if a + b * n < t0 * (n / n0) ** p:
            return (f"sparse is faster than dense from about L = {n} (extrapolated: dense wall time grows as "
                    f"L^{p:.2f}, sparse as {b * 1024:.2f} s per 1K tokens; timed up to {max(timed)})")
    return "sparse is faster than dense: no crossover below 4M tokens in the extrapolation"


if __name__ == "__main__":
    main()
