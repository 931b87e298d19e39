#!/usr/bin/env bash
# The GPU benchmarks in one prepared command, for one NVIDIA H100 / H200 with Python 3.12 and jax with CUDA
# installed, where nothing can be downloaded. Run from anywhere: bash benchmarks/device.sh
#
#   1. packages: the wheels carried in shared/wheels/, wheels/ or .whl/ (the first that holds any), installed
#      with pip --no-index --find-links into /tmp/glm5-site (what the machine lacks: grain, array_record,
#      tensorboardX, ...); the repository itself is staged as the glm5_jax package in /tmp/glm5-src (its
#      data/, sharding/ and configs/ folders are subpackages, as setup.cfg maps them), so no build is needed;
#   2. glm5 bench --config glm5-proxy-1gpu --parts step,data: the GLM-5 proxy's train step (the released
#      per-layer shapes, 1 dense + 2 MoE layers of 16 experts + MTP, 2 x 4,096 tokens, sparse DSA);
#   3. benchmarks/long_context.py: one GLM-5 attention layer, sparse at 4K, 8K, 32K and 128K, dense at 4K
#      and 8K (dense [L, L] scores alone need 275 GB at 32K: more than one GPU holds), and the crossover;
#   4. benchmarks/expert_matmul.py: ragged_dot against the tiled expert loop at the proxy's expert shapes;
#   5. glm5 bench --config tiny with a 352 MB state --parts checkpoint,convert (the save / restore rates and the
#      async stall with a real device-to-host copy).
# Results under $OUT (default ./device-results): device.log (everything printed) and one JSON per benchmark.
# Each benchmark has its own time limit (8 minutes in all); one that fails or times out does not stop the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-./device-results}
mkdir -p "$OUT"
LOG="$OUT/device.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.94}

say() { echo "== $*" | tee -a "$LOG"; }

for dir in shared/wheels wheels .whl; do
  if compgen -G "$dir/*.whl" >/dev/null; then
    say "installing $(ls "$dir"/*.whl | wc -l) carried wheels from $dir"
    $PY -m pip install -q --no-index --find-links "$dir" --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/glm5-site "$dir"/*.whl >>"$LOG" 2>&1 || { say "pip install failed"; exit 1; }
    export PYTHONPATH=/tmp/glm5-site${PYTHONPATH:+:$PYTHONPATH}
    break
  fi
done
rm -rf /tmp/glm5-src && mkdir -p /tmp/glm5-src
cp -r glm5_jax /tmp/glm5-src/ && cp -r data sharding configs /tmp/glm5-src/glm5_jax/
export PYTHONPATH=/tmp/glm5-src${PYTHONPATH:+:$PYTHONPATH}

say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; $PY --version; nproc; } \
  >>"$LOG" 2>&1
$PY - >>"$LOG" 2>&1 <<'PY' || { say "no usable GPU jax (see above)"; exit 1; }
import importlib.metadata as md
import jax
import glm5_jax.data.loader, glm5_jax.bench.command  # every package the benchmarks import
print(jax.devices(), {p: md.version(p) for p in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain")})
assert jax.devices()[0].platform == "gpu", "jax sees no GPU"
PY

run() {  # run LIMIT_S NAME COMMAND...: one benchmark, its output appended to the log
  local limit=$1 name=$2; shift 2
  say "$name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | grep --line-buffered -v -E "^[WIE][0-9]{4} " | tee -a "$LOG"
  say "$name: exit status ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

run 240 bench-proxy $PY -m glm5_jax.cli bench --config glm5-proxy-1gpu --steps 5 --parts step,data \
  --json "$OUT/bench-proxy.json"
run 120 long-context $PY benchmarks/long_context.py --lengths 4096,8192,32768,131072 --compile-only "" \
  --run-up-to 131072 --dense-up-to 8192 --dtype bfloat16 --paths sparse,dense
$PY - "$LOG" "$OUT/long_context.json" <<'PY'
import json, re, sys
lines = open(sys.argv[1]).read().split("== long-context")[1].splitlines()
row = re.compile(r"^(sparse|dense|warmup)\s+(\d+)\s+([\d.]+) GB\s+([\d.e+]+)\s+([\d.]+) s\s+(?:([\d.]+) s|-)$")
rows = [dict(path=m[1], length=int(m[2]), temp_gb=float(m[3]), analytic_flops=float(m[4]), compile_s=float(m[5]),
             wall_s=float(m[6]) if m[6] else None) for m in map(row.match, lines) if m]
notes = [l for l in lines if l.startswith(("sparse:", "dense:", "sparse is"))]
json.dump({"rows": rows, "notes": notes}, open(sys.argv[2], "w"), indent=2)
print(f"wrote {sys.argv[2]}: {len(rows)} rows")
PY
run 60 expert-matmul $PY benchmarks/expert_matmul.py --repeats 5 --json "$OUT/expert_matmul.json"
run 60 bench-checkpoint $PY -m glm5_jax.cli bench --config tiny --parts checkpoint,convert --disk-bytes 2GiB \
  --json "$OUT/bench-checkpoint.json" model_overrides.hidden_size=512 model_overrides.intermediate_size=1024 \
  model_overrides.moe_intermediate_size=256 model_overrides.n_routed_experts=32
say "done after $SECONDS s; results in $OUT"
ls -l "$OUT" | tee -a "$LOG"
