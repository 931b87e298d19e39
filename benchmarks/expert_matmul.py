"""The routed experts' grouped matmul: `jax.lax.ragged_dot` against the tiled loop (model config `expert_matmul`).

Both run `glm5_jax.model.moe.grouped_experts`, the MoE's own dropless expert compute (sort token copies by
expert, gate / up / down per expert, weighted sum back per token): `tile=0` is ragged_dot (a grouped GEMM on
GPU / TPU; XLA:CPU computes it densely, every row through every expert), `tile=T` the portable loop over
row tiles of T rows. For each it prints and writes (--json) the compile time, the median wall time of a
forward + backward (inputs and the three expert weights differentiated), the analytic FLOPs of the active
experts (6 x tokens x k x 3 D F), the compiled program's matmul FLOPs with loops at their trip counts
(glm5_jax/accounting/compiled.py) and the compiler's temporaries. Routing is random (top-k of Gaussian logits).

    .venv/bin/python benchmarks/expert_matmul.py [--tokens 8192] [--hidden 6144] [--ffn 2048] [--experts 16]
        [--topk 8] [--tile 64] [--dtype bfloat16] [--repeats 10] [--impls ragged_dot,tiled] [--json OUT]

Defaults: the GLM-5 proxy's expert shapes (configs/models/glm5-proxy-1gpu.yaml) and one step's tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from glm5_jax.accounting.compiled import count_flops
from glm5_jax.model.moe import grouped_experts

IMPLS = ("ragged_dot", "tiled")


def inputs(tokens: int, hidden: int, ffn: int, experts: int, topk: int, dtype):
    """Token activations, random top-k routing and the three expert weights (GLM-5's init scale)."""
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (tokens, hidden), dtype)
    weights, idx = jax.lax.top_k(jax.random.normal(keys[1], (tokens, experts)), topk)
    weights = jax.nn.softmax(weights, axis=-1)
    w = lambda k, shape: (0.02 * jax.random.normal(k, shape)).astype(dtype)
    gate, up = w(keys[2], (experts, hidden, ffn)), w(keys[3], (experts, hidden, ffn))
    down = w(keys[4], (experts, ffn, hidden))
    probe = jax.random.normal(keys[5], (tokens, hidden), jnp.float32)
    return x, idx, weights, gate, up, down, probe


def step(experts: int, tile: int):
    """Forward + backward of the grouped experts: the loss (so the whole forward is live, as in training) and
    the gradients of x and the three weights."""
    def loss(x, gate, up, down, idx, weights, probe):
        out, _ = grouped_experts(x, idx, weights, gate, up, down, experts, tile)
        return jnp.sum(out.astype(jnp.float32) * probe)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def measure(impl: str, args, dtype) -> dict:
    x, idx, weights, gate, up, down, probe = inputs(args.tokens, args.hidden, args.ffn, args.experts, args.topk,
                                                    dtype)
    fn = step(args.experts, 0 if impl == "ragged_dot" else args.tile)
    operands = (x, gate, up, down, idx, weights, probe)
    t0 = time.perf_counter()
    compiled = fn.lower(*operands).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*operands))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*operands))
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    analytic = 6.0 * args.tokens * args.topk * 3 * args.hidden * args.ffn
    counted = count_flops(compiled.as_text()).flops
    return {"impl": impl, "compile_s": compile_s, "median_s": median, "min_s": min(times), "max_s": max(times),
            "analytic_flops": analytic, "compiled_flops": counted, "compiled_over_analytic": counted / analytic,
            "analytic_flops_per_s": analytic / median,
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=6144)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--tile", type=int, default=64, help="rows per tile of the tiled loop (model: expert_tile)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=10, help="timed runs after one warm-up")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    args = ap.parse_args()
    impls = [i for i in args.impls.split(",") if i]
    for i in impls:
        if i not in IMPLS:
            raise SystemExit(f"--impls: {i!r} is not one of {', '.join(IMPLS)}")
    device = jax.devices()[0]
    where = f"{device.device_kind} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    print(f"{where}, jax {jax.__version__}; {args.tokens} tokens x top-{args.topk} of {args.experts} experts, "
          f"D {args.hidden}, F {args.ffn}, {args.dtype}, forward + backward")
    print(f"{'impl':11} {'compile':>9} {'median':>10} {'analytic':>10} {'compiled':>10} {'ratio':>6} {'FLOP/s':>10} "
          f"{'temps':>10}")
    rows = []
    for impl in impls:
        r = measure(impl, args, jnp.dtype(args.dtype))
        rows.append(r)
        print(f"{impl:11} {r['compile_s']:>7.1f} s {r['median_s']:>8.4f} s {r['analytic_flops']:>10.3e} "
              f"{r['compiled_flops']:>10.3e} {r['compiled_over_analytic']:>6.2f} {r['analytic_flops_per_s']:>10.3e} "
              f"{r['temp_bytes'] / 2**30:>6.2f} GiB", flush=True)
    if len(rows) == 2:
        print(f"ragged_dot / tiled wall time: {rows[0]['median_s'] / rows[1]['median_s']:.3f}")
    if args.json:
        doc = {"device": device.device_kind, "platform": device.platform, "jax": jax.__version__,
               "shapes": {k: getattr(args, k) for k in ("tokens", "hidden", "ffn", "experts", "topk", "tile")},
               "dtype": args.dtype, "results": rows}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
