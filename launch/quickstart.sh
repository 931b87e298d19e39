#!/usr/bin/env bash
# The quickstart: set up, then run a tiny GLM-5 end to end on CPU. Today that is initialise ->
# forward -> export to HF safetensors -> import back -> forward again (logits must match); the
# training run joins here when the trainer lands.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
RUN=${RUN:-runs/quickstart}
rm -rf "$RUN" && mkdir -p "$RUN"
glm5=.venv/bin/glm5
$glm5 init --config tiny --out "$RUN/init" --seed 0
.venv/bin/python -c "import numpy as np; from glm5_jax import config
np.save('$RUN/ids.npy', np.random.default_rng(0).integers(0, config.load('tiny').vocab_size, (2, 64)))"
$glm5 forward --checkpoint "$RUN/init" --input-ids "$RUN/ids.npy" --output "$RUN/logits.npy"
$glm5 convert orbax-to-hf --checkpoint "$RUN/init" --out "$RUN/hf" --dtype float32
# config.json carries the architecture; this stack's own settings (here the query block) come as overrides.
$glm5 convert hf-to-orbax --hf-dir "$RUN/hf" --out "$RUN/reimported" --override attention_query_block=16
$glm5 forward --checkpoint "$RUN/reimported" --input-ids "$RUN/ids.npy" --output "$RUN/logits-reimported.npy"
.venv/bin/python - "$RUN" <<'PY'
import sys, numpy as np
run = sys.argv[1]
a, b = np.load(f"{run}/logits.npy"), np.load(f"{run}/logits-reimported.npy")
assert np.array_equal(a, b), "logits changed across export and import"
print(f"quickstart ok: logits {a.shape} identical after orbax -> HF safetensors -> orbax ({run}/hf)")
PY
