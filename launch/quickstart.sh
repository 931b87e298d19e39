#!/usr/bin/env bash
# The quickstart: set up .venv, then train the tiny GLM-5 on CPU over 8 simulated devices (pipeline 2 x
# expert 2 x tensor 2) with configs/recipes/quickstart.yaml on the embedded corpus; stop at step 25, resume from the
# checkpoint to the end (step 50, across a 128 -> 256 token context switch), export the trained checkpoint to
# HF safetensors, load it in transformers, and plot the curves. Outputs: runs/quickstart/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh --test   # --test adds transformers (CPU torch) to check the export loads
RUN=${RUN:-runs/quickstart}
rm -rf "$RUN" && mkdir -p "$RUN"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
export JAX_PLATFORMS=cpu
glm5=.venv/bin/glm5
start=$(date +%s)
echo "== train to step 25, then stop"
$glm5 train --config quickstart run_dir="$RUN/train" max_steps=25
echo "== run again: resumes from the step-25 checkpoint and trains to the end"
$glm5 train --config quickstart run_dir="$RUN/train"
echo "== export the trained checkpoint to HF safetensors"
$glm5 convert orbax-to-hf --checkpoint "$RUN/train/checkpoints" --out "$RUN/hf" --dtype float32 -q
.venv/bin/python - "$RUN" <<'PY'
import json, sys
run = sys.argv[1]
recs = [json.loads(l) for l in open(f"{run}/train/metrics.jsonl")]
print("loss by step: " + ", ".join(f"{r['step']}: {r['loss']:.3f}" for r in recs if r["step"] % 10 == 0 or r["step"] == 1))
first, last = recs[0]["loss"], recs[-1]["loss"]
assert last < first - 1.0, f"loss did not fall: {first} -> {last}"
try:
    import torch, transformers
except ImportError:
    print("transformers / torch not installed: skipping the load check (bash launch/setup_env.sh --test adds them)")
    sys.exit(0)
model = transformers.AutoModelForCausalLM.from_pretrained(f"{run}/hf", dtype=torch.float32).eval()
ids = torch.tensor([list(b"def main():\n    return 0\n")]) + 3   # byte tokens are ids 3..258
with torch.no_grad():
    out = model(ids, labels=ids)
print(f"transformers loads the export: {type(model).__name__}, loss on a code snippet {out.loss.item():.3f}")
PY
echo "== held-out loss of the trained checkpoint (glm5 eval), and the eval records of the run"
$glm5 eval --checkpoint "$RUN/train/checkpoints" --data default --stage long --batches 4 --holdout 0.02
.venv/bin/python - "$RUN" <<'PY'
import json, sys
evals = [json.loads(l) for l in open(f"{sys.argv[1]}/train/eval.jsonl")]
print("eval loss by step: " + ", ".join(f"{e['step']}: {e['loss']:.3f}" for e in evals))
PY
$glm5 plot "$RUN/train"
echo "quickstart ok in $(( $(date +%s) - start )) s: loss $(head -1 "$RUN/train/metrics.jsonl" | .venv/bin/python -c 'import json,sys; print(round(json.load(sys.stdin)["loss"], 3))') -> $(tail -1 "$RUN/train/metrics.jsonl" | .venv/bin/python -c 'import json,sys; print(round(json.load(sys.stdin)["loss"], 3))'); curves in $RUN/train/curves.png"
