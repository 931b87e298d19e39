"""`glm5 plan`: compile one full train step ahead of time and report per-device memory and FLOPs.

The step (forward, loss, backward, Muon-Split / AdamW update) is lowered with ShapeDtypeStructs that
carry their shardings and compiled for N simulated CPU devices, so nothing of the model is allocated:
the 744B configuration plans on a laptop. Memory comes from two independent sources: an analytic
per-device split of parameter and optimizer bytes (each array's shard shape under its sharding), and
XLA's `compiled.memory_analysis()` (arguments, outputs, donated aliases, temporaries). FLOPs come from
an analytic per-component count (written out in `analytic_flops`) next to `compiled.cost_analysis()`,
which counts every loop body (layer scans, query-block maps, tiled expert loops) once.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
import time

from glm5_jax.config import ConfigError

CHILD_ENV = "GLM5_PLAN_CHILD"  # set in a re-executed plan process: never re-execute twice
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
GIB = 2**30


def parse_bytes(text: str, key: str = "--device-memory") -> int:
    """`80GB` -> 80e9, `80GiB` -> 80 * 2**30, `512MB`, `1.5TB`, a bare number of bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"{key}: expected a size such as 80GB, 80GiB or 512MB; got {text!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


# ----------------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------------

def _forced_device_count() -> int | None:
    m = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return int(m.group(1)) if m else None


def cpu_devices_ready(n: int) -> bool:
    """Arrange `n` simulated CPU devices in this process if JAX allows it; False if a fresh process is needed.

    Before JAX's backends start, `jax_num_cpu_devices` (and `jax_platforms=cpu`) can still be set; after,
    the device count is fixed, and an already-initialised process with fewer CPU devices must re-execute.
    An `XLA_FLAGS` device count already present (e.g. a test session's 8) is respected, never lowered.
    """
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():
        forced = _forced_device_count()
        if forced is None or forced < n:
            if forced is not None:  # the flag would contradict the count we set; let the child set it
                return False
            jax.config.update("jax_num_cpu_devices", n)
        jax.config.update("jax_platforms", "cpu")
    return len(jax.devices("cpu")) >= n


def reexec_with_devices(n: int, argv: list[str]) -> int:
    """Run `glm5 <argv>` again in a child process that starts JAX with `n` CPU devices; its exit status."""
    if os.environ.get(CHILD_ENV):
        raise ConfigError(f"--devices: could not create {n} simulated CPU devices")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = {**os.environ, CHILD_ENV: "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip()}
    sys.stdout.flush()
    return subprocess.run([sys.executable, "-m", "glm5_jax.cli", *argv], env=env, check=False).returncode


# ----------------------------------------------------------------------------------------------------
# Abstract inputs
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PlanInputs:
    """The train step (`glm5_jax.train.step.TrainStep`, the program `glm5 train` runs) and its arguments as
    ShapeDtypeStructs with shardings: no device memory."""

    cfg: object
    par: object
    step: object  # TrainStep
    params: object
    rest: object
    opt_state: object
    batch: dict
    routes: dict


def batch_shards(par) -> int:
    """How many ways the layout splits the batch dimension."""
    return par.axis_size("batch")


def abstract_inputs(cfg, par, global_batch: int, seq_len: int, opt_cfg, loss_cfg=None, accumulate: int = 1,
                    trainable: str = "all") -> PlanInputs:
    """The train step of `global_batch` rows of `seq_len` as `accumulate` microbatches, and its arguments."""
    from glm5_jax import optim
    from glm5_jax.train import losses
    from glm5_jax.train import step as S

    loss_cfg = losses.LossConfig() if loss_cfg is None else loss_cfg
    state = S.abstract_state(cfg)
    tx = optim.make_optimizer(opt_cfg, cfg, state.params)
    spec = S.StepConfig(cfg, loss_cfg, global_batch // accumulate, seq_len, accumulate, trainable)
    step = S.TrainStep(spec, tx, par, state)
    params, rest, opt_state, batch, *_ = step.abstract_args()
    routes = optim.param_routes(state.params, cfg, opt_cfg)
    return PlanInputs(cfg, par, step, params, rest, opt_state, batch, routes)


def check_batch(par, global_batch: int, seq_len: int, accumulate: int = 1):
    """The step's rows must split into `accumulate` microbatches that split evenly over the batch shards
    (and pipeline microbatches), the sequence over the context shards: otherwise the rules would silently
    replicate it. (The trainer's own check, `glm5_jax.train.setup.choose_accumulation`.)"""
    from glm5_jax.train.setup import choose_accumulation

    choose_accumulation("--global-batch", accumulate, global_batch, seq_len, par, None)


# ----------------------------------------------------------------------------------------------------
# Compile
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Compiled:
    compiled: object
    lower_s: float
    compile_s: float


def compile_step(inputs: PlanInputs) -> Compiled:
    """Lower and compile the train step (params, router bias and optimizer state donated)."""
    t0 = time.perf_counter()
    lowered = inputs.step.lower()
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return Compiled(compiled, t1 - t0, time.perf_counter() - t1)


# ----------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------

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
    """Per-device bytes: the analytic split (from shardings) and XLA's buffer assignment."""

    params: int
    optimizer: int
    rest: int
    batch: int
    params_total: int
    optimizer_total: int
    argument: int
    output: int
    alias: int
    temp: int
    code: int

    @property
    def peak(self) -> int:
        """Live bytes at the step's high-water mark: inputs + outputs (donated ones counted once) + temporaries."""
        return self.argument + self.output - self.alias + self.temp


def memory(inputs: PlanInputs, compiled) -> Memory:
    stats = compiled.memory_analysis()
    return Memory(
        params=shard_bytes(inputs.params), optimizer=shard_bytes(inputs.opt_state), rest=shard_bytes(inputs.rest),
        batch=shard_bytes(inputs.batch), params_total=full_bytes(inputs.params),
        optimizer_total=full_bytes(inputs.opt_state),
        argument=int(stats.argument_size_in_bytes), output=int(stats.output_size_in_bytes),
        alias=int(stats.alias_size_in_bytes), temp=int(stats.temp_size_in_bytes),
        code=int(stats.generated_code_size_in_bytes))


# ----------------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Flops:
    """One component of the step's FLOPs (whole step, all devices).

    `per_device`: the share one device computes (model work split over the batch, context, tensor and
    pipeline shards; Newton-Schulz over each matrix's shards: replicated matrices are orthogonalised on
    every device). `loops`: trip count of the loops around it whose body XLA's cost analysis counts once,
    so that analysis sees about `per_device / loops`. `model`: part of model FLOPs (6 N T + attention);
    False for optimizer and rematerialisation work.
    """

    name: str
    formula: str
    flops: float
    per_device: float
    loops: float = 1  # for Newton-Schulz a FLOP-weighted mean over leaves of different stack depths
    model: bool = True


def _attention_shape(cfg, batch: int, seq: int, context: int):
    """(sparse?, padded query count, query blocks per sequence shard) as mla/dsa run them."""
    if seq <= cfg.index_topk:
        return False, batch * seq, 1
    local = seq // context
    block = min(cfg.attention_query_block, local)
    blocks = -(-local // block)
    return True, batch * context * blocks * block, blocks


def expert_tiles(cfg, par, tokens: int) -> tuple[int, int]:
    """(tile rows, tiles per device per MoE layer) of the portable tiled expert loop; (0, 1) for ragged_dot."""
    import jax

    tiled = cfg.expert_matmul == "tiled" or (cfg.expert_matmul == "auto" and jax.default_backend() == "cpu")
    if not tiled:
        return 0, 1
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    ep = par.axis_size("experts")
    if ep > 1:  # capacity dispatch: each device runs n_shards * capacity rows through its local experts
        local_copies = tokens * k // max(1, par.axis_size("batch") * par.axis_size("length"))
        factor = par.config.capacity_factor
        capacity = local_copies if factor is None else max(1, math.ceil(factor * local_copies / ep))
        rows, experts = ep * capacity, E // ep
    else:
        rows, experts = tokens * k, E
    return cfg.expert_tile, -(-(rows + experts * (cfg.expert_tile - 1)) // cfg.expert_tile)


def work_split(par, params=None) -> int:
    """Ways the model's work is divided: batch x context x tensor shards, x pipeline stages when parameters
    are sharded over `pipeline` (a pipeline layout that is in effect). Other axes replicate work."""
    import jax

    mesh = par.mesh
    split = par.axis_size("batch") * par.axis_size("length") * mesh.shape["tensor"]
    if mesh.shape["pipeline"] > 1 and params is not None and any(
            "pipeline" in jax.tree.leaves(tuple(x.sharding.spec)) for x in jax.tree.leaves(params)):
        split *= mesh.shape["pipeline"]
    return min(split, mesh.size)


def shard_counts(params: dict) -> dict[str, int]:
    """Dotted parameter name -> how many shards its sharding cuts it into (size / shard size)."""
    return {name: math.prod(x.shape) // max(1, math.prod(x.sharding.shard_shape(x.shape)))
            for name, x in params.items()}


def analytic_flops(cfg, par, batch: int, seq: int, routes: dict, opt_cfg, params=None, mtp_depths: int = 0,
                   accumulate: int = 1) -> list[Flops]:
    """Per-component FLOPs of one train step, counting matrix multiplies (2 FLOPs per multiply-add).

    T = batch * seq tokens. A weight W applied to every token costs 2|W|T forward and 4|W|T backward
    (input and weight gradients): 6|W|T. Per layer (D hidden, H heads, ql/C q/kv LoRA ranks, dn/dr/dv
    nope/rope/value head dims, K = index_topk, Hi/Di indexer heads/dim):

    - attention projections: 6T(D ql + ql H (dn+dr) + D (C+dr) + C H (dn+dv) + H dv D)
    - attention core, dense path (seq <= K; full L x L scores, masked, as computed): 6 B L^2 H (dn+dr+dv)
    - attention core, sparse path (seq > K; absorbed MLA over K gathered latents): 6 Tq H K (2C + dr),
      Tq = queries padded to whole blocks
    - indexer (sparse path, 'full' layers; forward only: its output is integer top-k indices, so no
      gradient flows back through it): 2T(ql Hi Di + D Di + D Hi) + 2 Tq L Hi (Di + 1)
    - dense FFN: 6T * 3 D I;  MoE: router 6T D E, routed experts 6T k 3 D F, shared expert 6T 3 D Fs
    - output head: 6T D V. The embedding is a gather (0).
    - MTP (`mtp_depths` > 0), per depth: eh_proj 6T 2D D, one MoE decoder layer (its attention, indexer,
      router and experts as above) and the output head again.
    `accumulate` microbatches run in a loop whose body a cost analysis counts once: every model part's
    `loops` grows by that factor.
    - Muon Newton-Schulz (per matrix m x n, m <= n, per iteration): 4 m^2 n + 2 m^3
    - rematerialisation (hardware, not model FLOPs): the forward work the policy recomputes in backward
      (`full`: every layer's forward; `save_dots_no_batch`: the batched einsums of the attention core,
      the indexer scores and the absorbed kv_b products; `save_dots`/`none`: nothing).
    Norms, softmax, RoPE and other elementwise work is not counted. `params`: the sharded abstract
    parameters, for the per-device split (see `Flops`); without them, everything is divided by the devices.
    """
    from glm5_jax.model import layer_groups

    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    ql, C, dn, dr, dv = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    Hi, Di, K = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    T = batch * seq
    sparse, Tq, blocks = _attention_shape(cfg, batch, seq, par.axis_size("length"))
    w_attn = D * ql + ql * H * (dn + dr) + D * (C + dr) + C * H * (dn + dv) + H * dv * D
    core = 6 * Tq * H * K * (2 * C + dr) if sparse else 6 * batch * seq * seq * H * (dn + dr + dv)
    idx_proj, idx_scores = 2 * T * (ql * Hi * Di + D * Di + D * Hi), 2 * Tq * seq * Hi * (Di + 1)
    _, tiles = expert_tiles(cfg, par, T)
    groups = layer_groups(cfg)
    n_all = sum(g.count for g in groups)
    n_moe = sum(g.count for g in groups if g.moe)
    n_idx = sum(g.count for g in groups if g.indexer)
    # Loop trips XLA counts once: one scan per layer group (the longest is the bound that matters).
    scan = max(g.count for g in groups)
    dense_scan = max((g.count for g in groups if not g.moe), default=1)
    moe_scan = max((g.count for g in groups if g.moe), default=1)
    split = work_split(par, params) if params is not None else par.mesh.size

    def part(name, formula, flops, loops=1):  # a model component, divided like the model's work
        return Flops(name, formula, flops, flops / split, loops * accumulate)

    out = [
        part("attention projections", "6T(D ql + ql H(dn+dr) + D(C+dr) + C H(dn+dv) + H dv D) x layers",
             6 * T * w_attn * n_all, scan),
        part("attention core (sparse, top-k)" if sparse else "attention core (dense, full L x L)",
             "6 Tq H K (2C+dr) x layers" if sparse else "6 B L^2 H (dn+dr+dv) x layers", core * n_all,
             scan * blocks),
    ]
    if sparse and n_idx:
        out += [part("indexer projections (fwd only)", "2T(ql Hi Di + D Di + D Hi) x full layers",
                     idx_proj * n_idx, scan),
                part("indexer scores (fwd only)", "2 Tq L Hi (Di+1) x full layers", idx_scores * n_idx,
                     scan * blocks)]
    if n_all - n_moe:
        out.append(part("dense FFN", "6T 3 D I x dense layers",
                        6 * T * 3 * D * cfg.intermediate_size * (n_all - n_moe), dense_scan))
    if n_moe:
        k, Fe, E, Fs = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts, \
            cfg.shared_intermediate_size
        out += [part("MoE router", "6T D E x MoE layers", 6 * T * D * E * n_moe, moe_scan),
                part("MoE routed experts (active)", "6T k 3 D F x MoE layers", 6 * T * k * 3 * D * Fe * n_moe,
                     moe_scan * tiles),
                part("MoE shared expert", "6T 3 D Fs x MoE layers", 6 * T * 3 * D * Fs * n_moe, moe_scan)]
    out.append(part("output head", "6T D V", 6 * T * D * V))
    if mtp_depths:
        k, Fe, E, Fs = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts, \
            cfg.shared_intermediate_size
        layer = 6 * T * (w_attn + 2 * D * D + D * E + 3 * D * (k * Fe + Fs) + D * V) + core + \
            ((idx_proj + idx_scores) if sparse else 0)
        out.append(part("MTP", "depths x (6T(attn + 2D D + D E + 3D(k F + Fs) + D V) + core (+ indexer))",
                        mtp_depths * layer, mtp_depths * blocks))
    shards = shard_counts(params) if params is not None else {}
    ns = newton_schulz_flops(routes, opt_cfg)
    if ns:
        ns_device = newton_schulz_flops(routes, opt_cfg, shards) if shards else ns / par.mesh.size
        loops = ns / newton_schulz_flops(routes, opt_cfg, once=True)
        out.append(Flops("Muon Newton-Schulz", f"{opt_cfg.ns_steps} x (4 m^2 n + 2 m^3) per matrix", ns, ns_device,
                         loops, model=False))
    remat = remat_flops(cfg, core, idx_proj, idx_scores, sparse, T, w_attn, n_all, n_moe, n_idx)
    if remat:
        out.append(Flops(f"remat recompute ({cfg.remat_policy})", "forward work the policy recomputes", remat,
                         remat / split, scan * (blocks if cfg.remat_policy != "full" else 1) * accumulate,
                         model=False))
    return out


def newton_schulz_flops(routes: dict, opt_cfg, shards: dict[str, int] | None = None, once: bool = False) -> float:
    """Newton-Schulz FLOPs per step over every Muon matrix (optax unrolls its iterations); with `shards`
    (parameter name -> shard count), what one device computes; with `once`, what a cost analysis that
    counts a loop body once sees (each leaf loops over its outermost batch axis: see optim/muon.py)."""
    total = 0.0
    for name, r in routes.items():
        batch = [a for a in range(len(r.shape)) if r.spec and a not in r.spec.reduction + r.spec.output]
        trips = r.shape[batch[0]] if once and batch else 1
        for count, fan_in, fan_out in r.matrices():
            m, n_ = min(fan_in, fan_out), max(fan_in, fan_out)
            total += count * opt_cfg.ns_steps * (4 * m * m * n_ + 2 * m ** 3) / (shards or {}).get(name, 1) / trips
    return total


def remat_flops(cfg, core, idx_proj, idx_scores, sparse, T, w_attn, n_all, n_moe, n_idx) -> float:
    """Forward FLOPs recomputed in the backward pass under cfg.remat_policy (see `analytic_flops`)."""
    policy = cfg.remat_policy
    if policy in ("none", "save_dots"):
        return 0.0
    D = cfg.hidden_size
    indexer = (idx_proj + idx_scores) * n_idx if sparse else 0.0
    if policy == "full":
        ffn = (3 * D * cfg.intermediate_size * (n_all - n_moe)
               + (D * cfg.n_routed_experts + cfg.num_experts_per_tok * 3 * D * cfg.moe_intermediate_size
                  + 3 * D * cfg.shared_intermediate_size) * n_moe)
        return 2 * T * (w_attn * n_all + ffn) + core / 3 * n_all + indexer
    absorbed = 2 * T * cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return core / 3 * n_all + (idx_scores * n_idx + absorbed * n_all if sparse else 0.0)


def active_params(cfg) -> int:
    """Parameters multiplied per token in the main model (no embedding gather, no MTP): N in 6 N T."""
    from glm5_jax.model import layer_groups

    D = cfg.hidden_size
    attn = (D * cfg.q_lora_rank + cfg.q_lora_rank * cfg.num_attention_heads * cfg.qk_head_dim
            + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
            + cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
            + cfg.num_attention_heads * cfg.v_head_dim * D)
    total = D * cfg.vocab_size
    for g in layer_groups(cfg):
        ffn = (D * cfg.n_routed_experts + 3 * D * cfg.moe_intermediate_size * cfg.num_experts_per_tok
               + 3 * D * cfg.shared_intermediate_size) if g.moe else 3 * D * cfg.intermediate_size
        total += g.count * (attn + ffn)
    return total


def xla_flops(compiled) -> float:
    """`compiled.cost_analysis()` flops of the per-device program (a dict, or a list of one on older jax)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", float("nan")))


# ----------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PlanResult:
    inputs: PlanInputs
    memory: Memory
    flops: list[Flops]
    xla_flops: float
    lower_s: float
    compile_s: float
    peak_rss: int
    device_memory: int
    seq_len: int
    global_batch: int

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.device_memory


def run(model: str, overrides=(), layout: str | None = None, layout_overrides=(), devices: int | None = None,
        seq_len: int = 4096, global_batch: int | None = None, device_memory: str = "80GB", opt_overrides=(),
        device_list=None, accumulate: int = 1, loss_overrides=()) -> PlanResult:
    """Plan one train step: load configs, build abstract inputs, compile, measure. Devices must exist."""
    import jax

    from glm5_jax import config
    from glm5_jax.sharding.context import Parallelism
    from glm5_jax.sharding.layout import load_layout
    from glm5_jax.train import losses
    from glm5_jax.train.setup import unit_rate_optimizer

    cfg = config.load(model, list(overrides))
    layout_cfg = load_layout(layout, list(layout_overrides))
    opt_cfg = unit_rate_optimizer(config.apply_overrides({}, list(opt_overrides)))  # as `glm5 train` runs it
    loss_cfg = losses.loss_config_from_dict(config.apply_overrides({}, list(loss_overrides)), "--loss ")
    limit = parse_bytes(device_memory)
    device_list = list(device_list if device_list is not None else jax.devices("cpu")[:devices or None])
    par = Parallelism.create(layout_cfg, device_list)
    if global_batch is None:
        global_batch = batch_shards(par) * layout_cfg.microbatches * accumulate
    if seq_len < 1 or global_batch < 1 or accumulate < 1:
        raise ConfigError(f"{'--seq-len' if seq_len < 1 else '--global-batch' if global_batch < 1 else '--accumulate'}"
                          ": must be a positive integer")
    check_batch(par, global_batch, seq_len, accumulate)
    inputs = abstract_inputs(cfg, par, global_batch, seq_len, opt_cfg, loss_cfg, accumulate)
    c = compile_step(inputs)
    flops = analytic_flops(cfg, par, global_batch, seq_len, inputs.routes, opt_cfg, inputs.params,
                           mtp_depths=inputs.step.depths, accumulate=accumulate)
    return PlanResult(inputs, memory(inputs, c.compiled), flops, xla_flops(c.compiled), c.lower_s, c.compile_s,
                      peak_rss_bytes(), limit, seq_len, global_batch)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def _sci(x: float) -> str:
    return f"{x:.3e}"


def memory_table(result: PlanResult):
    """Rich table: analytic split, XLA's buffers, peak vs device memory."""
    from rich.table import Table

    m, n = result.memory, result.inputs.par.mesh.size
    t = Table(title="per-device memory", title_justify="left")
    for col, justify in (("item", "left"), ("per device", "right"), ("source", "left")):
        t.add_column(col, justify=justify, no_wrap=True)
    t.add_row("parameters", _gib(m.params), f"analytic: {m.params:,} B per device ({_gib(m.params_total)} in all)")
    t.add_row("optimizer state", _gib(m.optimizer),
              f"analytic: {m.optimizer:,} B per device ({_gib(m.optimizer_total)} in all)")
    t.add_row("router bias + batch", _gib(m.rest + m.batch), f"analytic: {m.rest + m.batch:,} B per device")
    t.add_row("arguments", _gib(m.argument), "memory_analysis")
    t.add_row("outputs", _gib(m.output), "memory_analysis")
    t.add_row("aliased (donated params + opt)", _gib(-m.alias), "memory_analysis")
    t.add_row("temporaries (activations, grads)", _gib(m.temp), "memory_analysis")
    t.add_row("peak = args + outputs - alias + temp", _gib(m.peak), "memory_analysis", style="bold")
    verdict = "fits" if result.fits else "DOES NOT FIT"
    headroom = result.device_memory - m.peak
    t.add_row("device memory", _gib(result.device_memory),
              f"[{'green' if result.fits else 'red'}]{verdict}[/] ({_gib(abs(headroom))} "
              f"{'free' if headroom >= 0 else 'over'}; {n} devices)", style="bold")
    return t


def flops_table(result: PlanResult):
    """Rich table: analytic FLOPs per component, per step and per device, next to cost_analysis."""
    from rich.table import Table

    t = Table(title="FLOPs per step", title_justify="left")
    for col, justify in (("component", "left"), ("formula", "left"), ("all devices", "right"),
                         ("per device", "right"), ("loop trips", "right"), ("per device, loops once", "right")):
        t.add_column(col, justify=justify, no_wrap=True)
    for f in result.flops:
        t.add_row(f.name, f.formula, _sci(f.flops), _sci(f.per_device), f"{f.loops:.4g}", _sci(f.per_device / f.loops))
    model = [f for f in result.flops if f.model]
    t.add_row("model FLOPs (6 N T + attention)", "", _sci(sum(f.flops for f in model)),
              _sci(sum(f.per_device for f in model)), "", "", style="bold")
    t.add_row("analytic total (+ optimizer, remat)", "", _sci(sum(f.flops for f in result.flops)),
              _sci(per_device_total(result.flops)), "", _sci(loops_once(result.flops)), style="bold")
    t.add_row("XLA cost_analysis", "per-device program", "", _sci(result.xla_flops), "", "", style="bold")
    return t


def per_device_total(flops: list[Flops]) -> float:
    return sum(f.per_device for f in flops)


def loops_once(flops: list[Flops]) -> float:
    """What a cost analysis that counts every loop body once should see of the analytic count, per device."""
    return sum(f.per_device / f.loops for f in flops)


def notes(result: PlanResult) -> list[str]:
    """The lines printed under the tables: what the numbers mean and where they differ."""
    from glm5_jax.model import layer_groups

    cfg = result.inputs.cfg
    total = per_device_total(result.flops)
    ratio = result.xla_flops / total if total else float("nan")
    once = loops_once(result.flops)
    tokens = result.global_batch * result.seq_len
    n_active = active_params(cfg)
    scans = ", ".join(f"{g.count} {'MoE' if g.moe else 'dense'}" for g in layer_groups(cfg))
    lines = [(f"N (active params per token, no embedding/MTP) = {n_active:,}; T = {result.global_batch} x "
              f"{result.seq_len} = {tokens:,} tokens; 6 N T = {6 * n_active * tokens:.3e}.")]
    lines.append(f"cost_analysis / analytic per device = {ratio:.3f}. XLA's cost analysis counts every loop body "
                 f"once: the layer scans ({scans} layers), the query-block lax.map of sparse attention, the tiled "
                 f"expert loop (lax.map over tiles on CPU); so it sees about the 'loops once' figure ({once:.3e}), "
                 "plus the elementwise work (norms, softmax, optimizer) the analytic count leaves out.")
    lines.append("Memory is XLA:CPU's buffer assignment for the SPMD program of one device (expert matmul and "
                 "dispatch as on CPU: tiled loop, capacity all_to_all); a GPU/TPU compile differs somewhat. "
                 f"Parameters {cfg.param_dtype}, compute {cfg.dtype}, remat {cfg.remat_policy}.")
    lines.append(f"lower {result.lower_s:.1f} s, compile {result.compile_s:.1f} s, peak RSS of this process "
                 f"{result.peak_rss / GIB:.2f} GiB.")
    return lines


def print_report(result: PlanResult, console=None):
    from rich.console import Console

    from glm5_jax.sharding.mesh import describe

    console = console or Console(width=None if sys.stdout.isatty() else 180)
    cfg = result.inputs.cfg
    pc = result.inputs.par.config
    console.print(f"[bold]plan[/]: {cfg.num_hidden_layers} layers, mesh {describe(result.inputs.par.mesh)}, "
                  f"global batch {result.global_batch} x seq {result.seq_len}, microbatches {pc.microbatches}, "
                  f"expert dispatch {pc.expert_dispatch}, capacity factor {pc.capacity_factor}")
    console.print(memory_table(result))
    console.print(flops_table(result))
    for line in notes(result):
        console.print(line, highlight=False)
