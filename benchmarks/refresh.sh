#!/usr/bin/env bash
# Rerun the CPU benchmarks and rewrite BENCHMARKS.md from what they measured, all in one run on this machine:
#
#   glm5 bench   tiny (the model preset on the default data, one device), quickstart (8 simulated devices:
#                pipeline 2 x expert 2 x tensor 2), tiny with a 352 MB state (the checkpoint targets), and the
#                quickstart step in five more layouts (the compiled / analytic FLOP ratio, layout by layout), and
#                launch/quickstart.sh itself (every program's compile time, the total);
#   benchmarks/  data_throughput.py, input_overlap.py, generate_speed.py, optimizer_compare.py,
#                long_context.py (compile only: the layer's memory; timing the real layer on CPU takes minutes
#                per length), expert_matmul.py at small shapes, weight_push.py (asynchronous RL's weight pushes
#                against a memory copy) and rl_async.py (synchronous against asynchronous RL, ~4 minutes).
#
#   bash benchmarks/refresh.sh            # about 15 minutes on 2 cores; results in runs/benchmarks/
#
# Every command's output is kept in runs/benchmarks/NAME.log (and glm5 bench's figures in NAME.json); a
# command that fails is reported in BENCHMARKS.md with its exit status, and the others still run. Timings on
# a shared machine are noisy: BENCHMARKS.md gives CPU figures mostly as ratios measured in the same run.
set -uo pipefail
cd "$(dirname "$0")/.."
R=${RESULTS:-runs/benchmarks}
rm -rf "$R" && mkdir -p "$R"
export JAX_PLATFORMS=cpu PYTHONUNBUFFERED=1
PY=.venv/bin/python
GLM5=.venv/bin/glm5
BIG=(model_overrides.hidden_size=512 model_overrides.intermediate_size=1024 model_overrides.moe_intermediate_size=256
     model_overrides.n_routed_experts=32)
ONE_STAGE=(layout_overrides.microbatches=1)

run() {  # run NAME COMMAND...: output to $R/NAME.log, "exit-status seconds" to $R/NAME.status
  local name=$1 start=$SECONDS; shift
  echo "== $name: $*"
  "$@" >"$R/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - start))" >"$R/$name.status"
  echo "   exit status $rc after $((SECONDS - start)) s"
}

run bench-tiny $GLM5 bench --config tiny --steps 10 --parts step,data --json "$R/bench-tiny.json"
run bench-quickstart $GLM5 bench --config quickstart --steps 10 --json "$R/bench-quickstart.json"
run bench-checkpoint $GLM5 bench --config tiny --steps 3 --parts step,checkpoint,convert \
  --json "$R/bench-checkpoint.json" "${BIG[@]}"
run flops-one $GLM5 bench --config quickstart --steps 1 --warmup 1 --parts step --json "$R/flops-one.json" \
  "layout_overrides.mesh={data: 1}" "${ONE_STAGE[@]}" devices=1
run flops-data8 $GLM5 bench --config quickstart --steps 1 --warmup 1 --parts step --json "$R/flops-data8.json" \
  "layout_overrides.mesh={data: 8}" "${ONE_STAGE[@]}"
run flops-ep-tiled $GLM5 bench --config quickstart --steps 1 --warmup 1 --parts step \
  --json "$R/flops-ep-tiled.json" "layout_overrides.mesh={data: 2, expert: 2, tensor: 2}" "${ONE_STAGE[@]}" \
  model_overrides.expert_matmul=tiled
run flops-ep-ragged $GLM5 bench --config quickstart --steps 1 --warmup 1 --parts step \
  --json "$R/flops-ep-ragged.json" "layout_overrides.mesh={data: 2, expert: 2, tensor: 2}" "${ONE_STAGE[@]}" \
  model_overrides.expert_matmul=ragged_dot
run flops-mb4 $GLM5 bench --config quickstart --steps 1 --warmup 1 --parts step --json "$R/flops-mb4.json" \
  layout_overrides.microbatches=4
rm -rf runs/.jax-cache  # the quickstart from a cold compilation cache, every program's compile logged
RUN="$R/quickstart" JAX_LOG_COMPILES=1 run quickstart bash launch/quickstart.sh
run data-throughput $PY benchmarks/data_throughput.py --seconds 4
XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8" \
  run input-overlap $PY benchmarks/input_overlap.py --recipe quickstart --steps 10
run generate-speed $PY benchmarks/generate_speed.py
run optimizer-compare $PY benchmarks/optimizer_compare.py
run long-context $PY benchmarks/long_context.py --lengths 4096,16384 --compile-only "" --run-up-to 0
run expert-matmul $PY benchmarks/expert_matmul.py --tokens 2048 --hidden 256 --ffn 128 --experts 16 --topk 4 \
  --dtype float32 --repeats 5 --json "$R/expert-matmul.json"
run weight-push $PY benchmarks/weight_push.py --repeats 5
run rl-async $PY benchmarks/rl_async.py --out "$R/rl-async"
$PY -m glm5_jax.bench.summary "$R" BENCHMARKS.md
