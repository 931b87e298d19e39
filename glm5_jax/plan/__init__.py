"""`glm5 plan`: compile one full train step ahead of time and report per-device memory and FLOPs.

The step (forward, loss, backward, Muon-Split / AdamW update) is lowered with ShapeDtypeStructs that
carry their shardings and compiled for N simulated CPU devices or a TPU topology (libtpu's compiler, no TPU
needed), so nothing of the model is allocated: the 744B configuration plans on a laptop.

- `devices`: the target (`cpu`, `tpu:v5p-512`, ...) and its devices.
- `measure`: the abstract inputs, the compile, memory and FLOPs (the FLOP model is the model's:
  glm5_jax/accounting/analytic.py).
- `stages`: every stage of a recipe planned with the step that trains it (`--recipe R --stage all`).
- `report`: the tables.

Training never imports this package: the plan builds on `glm5_jax.train.step` / `glm5_jax.train.setup`.
"""

from glm5_jax.plan.devices import (
    CHILD_ENV,
    GIB,
    TPU_MEMORY,
    Target,
    cpu_devices_ready,
    device_memory,
    parse_bytes,
    parse_target,
    product_topology,
    reexec_with_devices,
    tpu_devices,
    versions,
)
from glm5_jax.plan.measure import (
    Memory,
    PlanInputs,
    PlanResult,
    abstract_inputs,
    batch_shards,
    check_batch,
    compile_step,
    full_bytes,
    measure,
    run,
    shard_bytes,
    step_flops,
    xla_flops,
)
from glm5_jax.plan.report import loops_once, per_device_total, print_report, print_stages, stage_table, verdict
from glm5_jax.plan.stages import StagePlan, devices_needed, plan_recipe, plan_stage

__all__ = ["CHILD_ENV", "GIB", "TPU_MEMORY", "Memory", "PlanInputs", "PlanResult", "StagePlan", "Target",
           "abstract_inputs", "batch_shards", "check_batch", "compile_step", "cpu_devices_ready", "device_memory",
           "devices_needed", "full_bytes", "loops_once", "measure", "parse_bytes", "parse_target",
           "per_device_total", "plan_recipe", "plan_stage", "print_report", "print_stages", "product_topology",
           "reexec_with_devices", "run", "shard_bytes", "stage_table", "step_flops", "tpu_devices", "verdict",
           "versions", "xla_flops"]
