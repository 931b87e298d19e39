"""Lower and compile one train step for abstract inputs, and measure it: per-device memory and FLOPs.

The step is `glm5_jax.train.step.TrainStep`, the program `glm5 train` runs, built from ShapeDtypeStructs that
carry their shardings, so nothing of the model is allocated. Memory comes from two independent sources: an
analytic per-device split of parameter and optimizer bytes (each array's shard shape under its sharding),
and the compiler's `memory_analysis()` (arguments, outputs, donated aliases, temporaries). FLOPs come from
the analytic count (glm5_jax/accounting/analytic.py) next to `cost_analysis()`, which counts every loop body
(layer scans, query-block maps, tiled expert loops, the accumulation loop) once. A TPU compile that does not fit
fails with RESOURCE_EXHAUSTED: that is the verdict, kept with the compiler's message.
"""

from __future__ import annotations

import dataclasses
import math
import time

from glm5_jax.accounting import analytic as F
from glm5_jax.errors import ConfigError
from glm5_jax.plan.devices import Target, parse_bytes
from glm5_jax.values import apply_overrides


@dataclasses.dataclass
class PlanInputs:
    """The train step (`glm5_jax.train.step.TrainStep`) and its arguments as ShapeDtypeStructs with
    shardings: no device memory."""

    cfg: object
    par: object
    step: object  # TrainStep
    params: object
    buffers: object
    opt_state: object
    batch: dict
    routes: dict
    opt_cfg: object


def batch_shards(par) -> int:
    """How many ways the layout splits the batch dimension."""
    return par.axis_size("batch")


def step_inputs(step, cfg, opt_cfg) -> PlanInputs:
    """The abstract arguments of `step` (a TrainStep) and Muon's routing of its parameters."""
    from glm5_jax import optim

    params, buffers, opt_state, batch, *_ = step.abstract_args()
    routes = optim.param_routes(step.abstract.params, cfg, opt_cfg)
    return PlanInputs(cfg, step.par, step, params, buffers, opt_state, batch, routes, opt_cfg)


def abstract_inputs(cfg, par, global_batch: int, seq_len: int, opt_cfg, loss_cfg=None, accumulate: int = 1,
                    trainable: str = "all") -> PlanInputs:
    """The train step of `global_batch` rows of `seq_len` as `accumulate` microbatches, and its arguments."""
    from glm5_jax.train import losses
    from glm5_jax.train import step as S

    loss_cfg = losses.LossConfig() if loss_cfg is None else loss_cfg
    spec = S.StepConfig(cfg, loss_cfg, global_batch // accumulate, seq_len, accumulate, trainable)
    return step_inputs(S.make_step(spec, par, opt_cfg, S.abstract_state(cfg)), cfg, opt_cfg)


def check_batch(cfg, par, global_batch: int, seq_len: int, accumulate: int = 1):
    """The step's rows must split into `accumulate` microbatches that the layout runs (the trainer's own
    check, `glm5_jax.train.setup.choose_accumulation`)."""
    from glm5_jax.train.setup import choose_accumulation

    choose_accumulation("--global-batch", accumulate, global_batch, seq_len, par, None, cfg)


@dataclasses.dataclass
class Compiled:
    compiled: object  # None when the compiler refused the program (out of memory)
    lower_s: float
    compile_s: float
    error: str | None = None  # the compiler's RESOURCE_EXHAUSTED message


def compile_step(inputs: PlanInputs) -> Compiled:
    """Lower and compile the train step (params, router bias and optimizer state donated). A compiler that
    runs out of device memory (TPU) gives `error`, not an exception: that is the plan's verdict."""
    import jax

    t0 = time.perf_counter()
    lowered = inputs.step.lower()
    t1 = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return Compiled(None, t1 - t0, time.perf_counter() - t1, " ".join(str(e).split())[:400])
    return Compiled(compiled, t1 - t0, time.perf_counter() - t1)


def shard_bytes(tree) -> int:
    """Bytes one device holds of `tree` (ShapeDtypeStructs with shardings): the largest shard per leaf."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def full_bytes(tree) -> int:
    """Bytes of `tree` unsharded (the whole model / optimizer state)."""
    import jax
    import numpy as np

    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class Memory:
    """Per-device bytes: the analytic split (from shardings) and the compiler's buffer assignment (None
    where the compiler refused the program)."""

    params: int
    optimizer: int
    buffers: int
    batch: int
    params_total: int
    optimizer_total: int
    argument: int | None = None
    output: int | None = None
    alias: int | None = None
    temp: int | None = None
    code: int | None = None

    @property
    def peak(self) -> int | None:
        """Live bytes at the step's high-water mark: inputs + outputs (donated ones counted once) + temporaries."""
        if self.temp is None:
            return None
        return self.argument + self.output - self.alias + self.temp


def memory(inputs: PlanInputs, compiled) -> Memory:
    m = Memory(params=shard_bytes(inputs.params), optimizer=shard_bytes(inputs.opt_state),
               buffers=shard_bytes(inputs.buffers), batch=shard_bytes(inputs.batch),
               params_total=full_bytes(inputs.params), optimizer_total=full_bytes(inputs.opt_state))
    if compiled is not None:
        stats = compiled.memory_analysis()
        m = dataclasses.replace(m, argument=int(stats.argument_size_in_bytes),
                                output=int(stats.output_size_in_bytes), alias=int(stats.alias_size_in_bytes),
                                temp=int(stats.temp_size_in_bytes), code=int(stats.generated_code_size_in_bytes))
    return m


def xla_flops(compiled) -> float:
    """`compiled.cost_analysis()` flops of the per-device program (a dict, or a list of one on older jax)."""
    if compiled is None:
        return float("nan")
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


def step_flops(inputs: PlanInputs) -> list[F.Flops]:
    """The analytic FLOPs of the planned step, split as its layout splits the work."""
    spec = inputs.step.spec
    shapes = {k: (x.shape, x.sharding.shard_shape(x.shape)) for k, x in inputs.params.items()}
    work = F.work_of(inputs.cfg, inputs.par, inputs.params)
    return F.analytic_flops(spec.model_cfg, work, spec.rows * spec.accumulate, spec.seq_len, inputs.routes,
                            inputs.opt_cfg, F.shard_counts(shapes), mtp_depths=inputs.step.depths,
                            accumulate=spec.accumulate, dsa_mode=spec.loss_cfg.dsa)


def compiled_flops(inputs: PlanInputs, compiled, target: Target):
    """Matmul FLOPs per device of the compiled program, every loop at its trip count
    (`glm5_jax.accounting.compiled.count_flops`); None when the compiler refused the program, and for a TPU
    target: the TPU compiler's optimized program carries no loop trip counts, writes products as
    convolutions over grouped features and runs the expert and attention kernels as custom calls, none of
    which the count reads (XLA:CPU and the GPU compiler keep the trip counts and plain products)."""
    from glm5_jax.accounting import compiled as hlo
    from glm5_jax.accounting import loops

    if compiled is None or target.is_tpu:
        return None
    spec = inputs.step.spec
    trips = loops.step_trips(spec, inputs.par.axis_size("length"), spec.accumulate)
    return hlo.count_flops(compiled.as_text(), trips)


@dataclasses.dataclass
class PlanResult:
    inputs: PlanInputs
    memory: Memory
    flops: list[F.Flops]
    xla_flops: float
    counted: object  # accounting.compiled.Count of the compiled program (None: refused for memory)
    lower_s: float
    compile_s: float
    peak_rss: int
    device_memory: int | None  # bytes of one device (None: a TPU kind whose HBM is not in TPU_MEMORY)
    target: Target
    error: str | None = None  # the compiler's out-of-memory message

    @property
    def seq_len(self) -> int:
        return self.inputs.step.spec.seq_len

    @property
    def global_batch(self) -> int:
        spec = self.inputs.step.spec
        return spec.rows * spec.accumulate

    @property
    def fits(self) -> bool:
        """The compiler accepted the program and its peak is within the device's memory."""
        if self.error is not None:
            return False
        return self.device_memory is None or self.memory.peak <= self.device_memory


def measure(inputs: PlanInputs, target: Target, device_memory: int | None) -> PlanResult:
    """Compile `inputs`' step and measure it."""
    c = compile_step(inputs)
    return PlanResult(inputs, memory(inputs, c.compiled), step_flops(inputs), xla_flops(c.compiled),
                      compiled_flops(inputs, c.compiled, target), c.lower_s, c.compile_s, peak_rss_bytes(),
                      device_memory, target, c.error)


def run(model: str, overrides=(), layout: str | None = None, layout_overrides=(), devices: int | None = None,
        seq_len: int = 4096, global_batch: int | None = None, device_memory: str | int | None = "80GB",
        opt_overrides=(), device_list=None, accumulate: int = 1, loss_overrides=(),
        target: Target | None = None) -> PlanResult:
    """Plan one train step: load configs, build abstract inputs, compile, measure. Devices must exist
    (`device_list`, default the first `devices` CPU devices)."""
    import jax

    from glm5_jax import config
    from glm5_jax.sharding.context import Parallelism
    from glm5_jax.sharding.layout import load_layout
    from glm5_jax.train import losses
    from glm5_jax.train.setup import unit_rate_optimizer

    target = target or Target("cpu", "cpu")
    cfg = config.load(model, list(overrides))
    layout_cfg = load_layout(layout, list(layout_overrides))
    opt_cfg = unit_rate_optimizer(apply_overrides({}, list(opt_overrides)))  # as `glm5 train` runs it
    loss_cfg = losses.loss_config_from_dict(apply_overrides({}, list(loss_overrides)), "--loss ")
    limit = parse_bytes(device_memory, "--device-memory") if isinstance(device_memory, str) else device_memory
    device_list = list(device_list if device_list is not None else jax.devices("cpu")[:devices or None])
    par = Parallelism.create(layout_cfg, device_list)
    if global_batch is None:
        global_batch = batch_shards(par) * layout_cfg.microbatches * accumulate
    if seq_len < 1 or global_batch < 1 or accumulate < 1:
        raise ConfigError(f"{'--seq-len' if seq_len < 1 else '--global-batch' if global_batch < 1 else '--accumulate'}"
                          ": must be a positive integer")
    check_batch(cfg, par, global_batch, seq_len, accumulate)
    return measure(abstract_inputs(cfg, par, global_batch, seq_len, opt_cfg, loss_cfg, accumulate), target, limit)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
