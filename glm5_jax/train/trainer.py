"""`glm5 train`: the training loop over a recipe's stages, with checkpoints, resume, guard rails and metrics.

State lives on device as flat dicts keyed by dotted variable names (`layers.1.mlp.gate`): `params` (trained),
`rest` (router bias buffers), and the optimizer state built over the params dict. The learning rate is an
argument of the jitted step: the optimizer runs with rate 1 and the step scales its update by the stage's
schedule at the stage-relative step (Muon's and AdamW's updates are both linear in the learning rate), so a
stage switch or a resume never rebuilds the optimizer state. A step whose loss or gradient norm is not finite
leaves params, rest and optimizer state unchanged (selected with `jnp.where` inside the step) and is counted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from glm5_jax import config as config_lib
from glm5_jax import optim
from glm5_jax.checkpoint.store import CheckpointReader, _nest
from glm5_jax.config import ConfigError
from glm5_jax.model import layer_groups
from glm5_jax.sharding.context import Parallelism, use
from glm5_jax.sharding.layout import load_layout
from glm5_jax.train import step as S
from glm5_jax.train.checkpointing import Checkpointer
from glm5_jax.train.metrics import MetricsLog, model_flops_per_step, peak_flops
from glm5_jax.train.recipe import Recipe

try:  # the full loss (MTP, balance, z, indexer KL); until it exists the main-head LM loss
    from glm5_jax.train import losses as _losses
except ImportError:  # pragma: no cover - depends on the checkout
    _losses = None

log = logging.getLogger("glm5.train")
NONFINITE_ENV = "GLM5_TEST_NONFINITE_STEPS"  # test hook: comma-separated global steps whose loss is made NaN


class TrainingStopped(RuntimeError):
    """The run stopped itself (too many non-finite steps); the last committed checkpoint is intact."""


def _json_values(d: dict) -> list[str]:
    import json

    return [f"{k}={json.dumps(v)}" for k, v in d.items()]


# ----------------------------------------------------------------------------------------------------
# Resolving a recipe into the configs it names (all validated before anything compiles)
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StagePlan:
    recipe: object  # StageRecipe
    data: object  # data Stage (start_step, end_step, seq_len, global_batch, ...)
    model_cfg: object
    opt_cfg: object  # schedule of this stage (learning_rate etc.)
    schedule: object  # optax schedule over the stage-relative step
    loss_cfg: object
    router_bias_rate: float


@dataclasses.dataclass
class Resolved:
    recipe: Recipe
    model_cfg: object
    data_cfg: object
    layout: object
    opt_base: object  # the optimizer with learning rate 1 (scaled per step)
    stages: list  # StagePlan, filled in `plan_stages` once the data schedule exists


def resolve(recipe: Recipe) -> Resolved:
    from glm5_jax.data import config as data_config

    model_over = _json_values(recipe.model_overrides)
    if recipe.init_from:
        cfg = CheckpointReader(recipe.init_from).config
        cfg = config_lib.from_dict(config_lib.apply_overrides(cfg.to_dict(), model_over))
    else:
        cfg = config_lib.load(recipe.model, model_over)
    layout = load_layout(recipe.layout, _json_values(recipe.layout_overrides))
    dcfg = data_config.load(recipe.data, _json_values(recipe.data_overrides))
    by_name = {s.name: s for s in dcfg.stages}
    stages = []
    for i, st in enumerate(recipe.stages):
        name = st.data_stage or st.name
        if name not in by_name:
            raise ConfigError(f"stages.{i}.data_stage: data config {recipe.data!r} has no stage {name!r}; "
                              f"its stages: {', '.join(by_name)}")
        ds = by_name[name]
        tokens = ds.tokens if st.steps is None else st.steps * ds.tokens_per_step
        stages.append(dataclasses.replace(ds, name=st.name, tokens=tokens))
    dcfg = data_config.from_dict(_data_dict(dataclasses.replace(dcfg, stages=stages)))
    base = dict(recipe.optimizer)
    for key in ("learning_rate", "schedule", "warmup_steps", "total_steps", "end_learning_rate", "decay_steps"):
        base.pop(key, None)
    opt_base = optim.from_dict({**base, "learning_rate": 1.0, "schedule": "constant", "warmup_steps": 0})
    return Resolved(recipe, cfg, dcfg, layout, opt_base, [])


def _data_dict(dcfg) -> dict:
    d = dataclasses.asdict(dcfg)
    for src in d["sources"].values():
        src.pop("name", None)
    return d


def plan_stages(res: Resolved, schedule) -> list[StagePlan]:
    recipe, plans = res.recipe, []
    for i, (st, ds) in enumerate(zip(recipe.stages, schedule.stages)):
        key = f"stages.{i}"
        values = {**recipe.optimizer, **st.schedule}
        values.setdefault("total_steps", ds.steps)
        try:
            opt_cfg = optim.from_dict(values)
        except ConfigError as e:
            raise ConfigError(f"{key}.schedule: {e}") from None
        over = {**ds.model_overrides(), **st.model_overrides}
        try:
            model_cfg = config_lib.from_dict({**res.model_cfg.to_dict(), **over})
        except ConfigError as e:
            raise ConfigError(f"{key}.model_overrides: {e}") from None
        loss_cfg = None
        if _losses is not None:
            try:
                loss_cfg = _losses.loss_config_from_dict({**recipe.losses, **st.losses})
            except ConfigError as e:
                raise ConfigError(f"{key}.losses: {e}") from None
        elif st.losses or recipe.losses:
            log.warning("losses: glm5_jax.train.losses is not available; training the main LM loss only")
        rate = float(loss_cfg.bias_update_rate) if loss_cfg is not None else 0.0
        plans.append(StagePlan(st, ds, model_cfg, opt_cfg, optim.learning_rate_schedule(opt_cfg), loss_cfg, rate))
    return plans


# ----------------------------------------------------------------------------------------------------
# State as flat dicts of dotted names
# ----------------------------------------------------------------------------------------------------


def flat(state) -> dict:
    """nnx State (arrays, ShapeDtypeStructs or shardings as values) -> {dotted name: value}."""
    return {".".join(map(str, p)): (v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(state)}


def to_state(values: dict, template) -> nnx.State:
    """{dotted name: value} -> an nnx State shaped like `template` (variable types and metadata kept)."""
    return nnx.from_flat_state([(p, v.replace(values[".".join(map(str, p))])) for p, v in nnx.to_flat_state(template)])


def unflatten(tree: dict) -> dict:
    """Orbax's nested dict of a checkpoint's `params` item -> {dotted name: value}."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                walk(v, name)
            else:
                out[name] = v
    walk(tree, "")
    return out


def _abstract(values: dict, shardings: dict) -> dict:
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[k]) for k, v in values.items()}


# ----------------------------------------------------------------------------------------------------
# The jitted step of one stage
# ----------------------------------------------------------------------------------------------------


def _indexer_mask(params_template, names) -> dict:
    if _losses is not None and hasattr(_losses, "trainable_mask"):
        mask = flat(_losses.trainable_mask(params_template, "indexer"))
        return {k: bool(np.all(np.asarray(mask[k]))) if not isinstance(mask[k], bool) else mask[k] for k in names}
    return {k: ".indexer." in f".{k}." for k in names}


def build_step(plan: StagePlan, par: Parallelism, tx, shardings: dict):
    abstract = S.abstract_state(plan.model_cfg)
    graphdef, tmpl_params, tmpl_rest = abstract
    names = list(flat(tmpl_params))
    mask = _indexer_mask(tmpl_params, names) if plan.recipe.trainable == "indexer" else None
    loss_cfg = plan.loss_cfg
    n_main = sum(g.count for g in layer_groups(plan.model_cfg) if g.moe)
    use_bias = _losses is not None and hasattr(_losses, "update_router_bias") and plan.router_bias_rate > 0

    def loss_fn(params, rest, batch, poison):
        p, r = to_state(params, tmpl_params), to_state(rest, tmpl_rest)
        if _losses is not None:
            loss, aux = _losses.total_loss(p, r, graphdef, batch, loss_cfg)
        else:
            loss, aux = S.lm_loss(p, r, graphdef, batch)
        return loss * poison, aux

    def step(params, rest, opt_state, batch, lr, rate, poison):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch, poison)
        if mask is not None:
            grads = {k: g if mask[k] else jnp.zeros_like(g) for k, g in grads.items()}
        gnorm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(gnorm)
        updates, new_opt = tx.update(grads, opt_state, params)
        updates = {k: (u * lr).astype(u.dtype) if mask is None or mask[k] else jnp.zeros_like(u)
                   for k, u in updates.items()}
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        params, opt_state = keep(new_params, params), keep(new_opt, opt_state)
        load = aux.get("expert_load")
        if use_bias and load is not None:
            new_rest = flat(_losses.update_router_bias(to_state(rest, tmpl_rest), load, rate))
            rest = keep(new_rest, rest)
        metrics = {"loss": loss, "grad_norm": gnorm, "finite": ok, "tokens": aux["tokens"]}
        for k, v in (aux.get("metrics") or {}).items():
            metrics[k] = v
        if load is not None:
            load = load.astype(jnp.float32)
            mean = jnp.maximum(jnp.mean(load, axis=-1), 1e-9)
            metrics["expert_load_max_over_mean"] = jnp.mean(jnp.max(load, axis=-1) / mean)
            main = load[:n_main]  # (the MTP layer's row, if any, sums its depths)
            copies = batch["input_ids"].size * plan.model_cfg.num_experts_per_tok * n_main
            metrics["dropped"] = 1.0 - jnp.sum(main) / copies
        return params, rest, opt_state, metrics

    batch_sh = shardings["batch"]
    jitted = jax.jit(step, in_shardings=(shardings["params"], shardings["rest"], shardings["opt"], batch_sh,
                                         None, None, None),
                     out_shardings=(shardings["params"], shardings["rest"], shardings["opt"], None),
                     donate_argnums=(0, 1, 2))

    def run(*args):
        with use(par):
            return jitted(*args)
    return run


# ----------------------------------------------------------------------------------------------------
# Multi-host
# ----------------------------------------------------------------------------------------------------

_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                    "TPU_WORKER_HOSTNAMES")


def maybe_initialize_distributed() -> bool:
    """`jax.distributed.initialize()` when launched as one of several processes: a coordinator address in
    the environment (JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID), a multi-task SLURM job,
    or a multi-host TPU VM. JAX's cluster detection fills in whatever is not given explicitly."""
    env = os.environ
    slurm = int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env
    tpu = len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
    explicit = env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
    if not (slurm or tpu or explicit or env.get("MEGASCALE_COORDINATOR_ADDRESS")):
        return False
    kwargs = {}
    if explicit:
        kwargs["coordinator_address"] = explicit
        if "JAX_NUM_PROCESSES" in env:
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in env:
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    return True


# ----------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------


class _Term:
    def __init__(self):
        self.flag = False
        self.previous = None

    def __enter__(self):
        def handler(signum, frame):
            self.flag = True
        try:
            self.previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def train(recipe: Recipe, out=print) -> dict:
    """Run `recipe` to its end (or max_steps / SIGTERM). Returns a summary dict (final step, losses, ...)."""
    from glm5_jax.data.pipeline import DataPipeline, global_batch, restore_args, save_args

    if recipe.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.abspath(recipe.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    maybe_initialize_distributed()
    res = resolve(recipe)
    pipe = DataPipeline(res.data_cfg)
    if pipe.vocab_size > res.model_cfg.vocab_size:
        raise ConfigError(f"data: the tokenizer emits {pipe.vocab_size} ids but the model's vocab_size is "
                          f"{res.model_cfg.vocab_size}")
    plans = plan_stages(res, pipe.schedule)
    devices = jax.devices()
    if recipe.devices is not None:
        if recipe.devices > len(devices):
            raise ConfigError(f"devices: {recipe.devices} requested but only {len(devices)} are available")
        devices = devices[:recipe.devices]
    try:
        par = Parallelism.create(res.layout, devices)
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"layout: {e}") from None
    shards, micro, context = par.axis_size("batch"), par.config.microbatches, par.axis_size("length")
    for i, p in enumerate(plans):
        if p.data.global_batch % (shards * micro):
            raise ConfigError(f"stages.{i}: {p.data.global_batch} rows per step do not split into {shards} batch "
                              f"shards x {micro} microbatches")
        if p.data.seq_len % context:
            raise ConfigError(f"stages.{i}: seq_len {p.data.seq_len} does not split into {context} context shards")
    total = pipe.schedule.total_steps
    end = total if recipe.max_steps is None else min(total, recipe.max_steps)
    start_plan = next((p for p in plans if p.recipe.name == recipe.start_stage), None)

    # Abstract state, shardings, optimizer.
    abstract = S.abstract_state(res.model_cfg, recipe.seed)
    p_sh, r_sh = flat(S.state_shardings(abstract.params, par)), flat(S.state_shardings(abstract.rest, par))
    p_abs, r_abs = _abstract(flat(abstract.params), p_sh), _abstract(flat(abstract.rest), r_sh)
    tx = optim.make_optimizer(res.opt_base, res.model_cfg, abstract.params)
    replicated = NamedSharding(par.mesh, PartitionSpec())
    opt_shape = jax.eval_shape(tx.init, p_abs)
    o_sh = optim.state_shardings(opt_shape, p_sh, replicated)
    o_abs = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt_shape, o_sh)

    run_dir = os.path.abspath(recipe.run_dir)
    os.makedirs(run_dir, exist_ok=True)
    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), recipe.checkpoint.max_to_keep,
                        recipe.checkpoint.async_save)
    it = pipe.iterator(0)
    restored = ckpt.restore_latest(_nest({**p_abs, **r_abs}), o_abs,
                                   lambda: restore_args(it), warn=lambda m: out(f"WARNING: {m}"))
    train_state = {"nonfinite_in_a_row": 0, "skipped_total": 0, "tokens_seen": 0,
                   "rng": np.asarray(jax.random.key_data(jax.random.key(recipe.seed))).tolist()}
    if restored is not None:
        step, variables, opt_state, saved = restored
        variables = unflatten(variables)
        params, rest = {k: variables[k] for k in p_abs}, {k: variables[k] for k in r_abs}
        train_state.update({k: saved[k] for k in train_state if k in saved})
        out(f"resumed from {ckpt.directory} step {step}")
        if start_plan is not None and start_plan.data.start_step > step:
            out(f"start_stage {start_plan.recipe.name}: jumping from step {step} to the stage's first step "
                f"{start_plan.data.start_step}")
            step = start_plan.data.start_step
            it.close()
            it = pipe.iterator(step)
    else:
        step = start_plan.data.start_step if start_plan is not None else 0
        if recipe.init_from:
            variables = _load_init(recipe.init_from, {**p_abs, **r_abs})
            params, rest = {k: variables[k] for k in p_abs}, {k: variables[k] for k in r_abs}
            out(f"initialised from {os.path.abspath(recipe.init_from)} (step {CheckpointReader(recipe.init_from).step})")
        else:
            state = S.init_sharded(res.model_cfg, par, recipe.seed)
            params, rest = flat(state.params), flat(state.rest)
        with use(par):
            opt_state = jax.jit(tx.init, out_shardings=o_sh)(params)
        if step:
            it.close()
            it = pipe.iterator(step)
    last_saved = step if restored is not None else None
    metrics_log = MetricsLog(run_dir, step, recipe.metrics.tensorboard, recipe.metrics.progress, end)
    shardings = {"params": p_sh, "rest": r_sh, "opt": o_sh}
    nonfinite_steps = {int(s) for s in os.environ.get(NONFINITE_ENV, "").split(",") if s.strip()}
    device = devices[0]
    peak = recipe.metrics.peak_flops or peak_flops(device.device_kind, device.platform)
    out(f"training {recipe.stages[0].name if step == 0 else pipe.stage_at(min(step, total - 1)).name} .. "
        f"step {end} of {total} on {len(devices)} {device.platform} devices, mesh "
        f"{dict(par.mesh.shape)}; run dir {run_dir}")

    summary = {"start_step": step, "losses": {}, "stopped": None}
    current, run_step, flops, batch_sh = None, None, 0.0, None
    save_time = time.monotonic()
    first_loss = last_loss = None

    def save(at: int):
        nonlocal last_saved, save_time
        variables = _nest({**params, **rest})
        model_cfg = (current or plans[0]).model_cfg.to_dict()
        ckpt.save(at, params=variables, opt_state=opt_state, train={**train_state, "step": at,
                  "stage": pipe.stage_at(min(at, total - 1)).name}, data_args=save_args(it),
                  model_config=model_cfg, recipe=recipe.to_dict())
        last_saved, save_time = at, time.monotonic()

    try:
        with _Term() as term:
            while step < end:
                stage = pipe.stage_at(step)
                plan = plans[stage.index]
                if plan is not current:
                    current = plan
                    out(f"stage {plan.recipe.name}: steps {stage.start_step}..{stage.end_step - 1}, "
                        f"{stage.global_batch} x {stage.seq_len} tokens, trainable {plan.recipe.trainable}, "
                        f"lr {plan.opt_cfg.schedule} {plan.opt_cfg.learning_rate:g}")
                    shape = (stage.global_batch, stage.seq_len)
                    row_sharding = par.sharding(S.BATCH_AXES, shape)
                    batch_sh = dict.fromkeys(("input_ids", "targets", "positions", "segment_ids"), row_sharding)
                    run_step = build_step(plan, par, tx, {**shardings, "batch": batch_sh})
                    flops = model_flops_per_step(plan.model_cfg, par, *shape)
                t0 = time.perf_counter()
                local = next(it)
                batch = global_batch({k: local[k] for k in batch_sh}, row_sharding)
                lr = float(plan.schedule(step - stage.start_step))
                poison = float("nan") if step + 1 in nonfinite_steps else 1.0
                params, rest, opt_state, m = run_step(params, rest, opt_state, batch, np.float32(lr),
                                                      np.float32(plan.router_bias_rate), np.float32(poison))
                m = jax.device_get(m)
                dt = time.perf_counter() - t0
                step += 1
                tokens = stage.global_batch * stage.seq_len
                train_state["tokens_seen"] += tokens
                loss = float(m["loss"])
                if bool(m["finite"]):
                    train_state["nonfinite_in_a_row"] = 0
                    first_loss = loss if first_loss is None else first_loss
                    last_loss = loss
                else:
                    train_state["nonfinite_in_a_row"] += 1
                    train_state["skipped_total"] += 1
                    metrics_log.line(f"step {step}: non-finite loss {loss} / grad norm {float(m['grad_norm'])}; "
                                     f"update skipped ({train_state['nonfinite_in_a_row']} in a row)")
                metrics_log.advance(step, plan.recipe.name, loss)
                if step % recipe.metrics.interval == 0 or step == summary["start_step"] + 1 or step == end:
                    record = {"step": step, "stage": plan.recipe.name, "loss": loss,
                              "grad_norm": float(m["grad_norm"]), "lr": lr, "tokens": int(m["tokens"]),
                              "tokens_per_s": tokens / dt, "mfu": flops / dt / (peak * len(devices)),
                              "step_time": dt, "skipped": train_state["skipped_total"]}
                    for k in ("lm", "mtp", "balance", "z", "indexer_kl", "expert_load_max_over_mean", "dropped"):
                        if k in m:
                            record[k] = float(m[k])
                    metrics_log.write(record)
                    summary["losses"][step] = loss
                if train_state["nonfinite_in_a_row"] >= recipe.max_nonfinite_in_a_row:
                    n = train_state["nonfinite_in_a_row"]
                    raise TrainingStopped(
                        f"{n} non-finite steps in a row (steps {step - n + 1}..{step}, max_nonfinite_in_a_row "
                        f"{recipe.max_nonfinite_in_a_row}); stopped without saving: the last checkpoint "
                        + (f"(step {last_saved}) " if last_saved is not None else "") + "is intact")
                c = recipe.checkpoint
                due = (c.interval_steps is not None and step % c.interval_steps == 0) or \
                      (c.interval_seconds is not None and time.monotonic() - save_time >= c.interval_seconds) or \
                      (c.save_at_stage_end and step == stage.end_step and step < end)
                if term.flag:
                    out(f"SIGTERM: saving step {step} and exiting")
                    save(step)
                    summary["stopped"] = "sigterm"
                    break
                if due:
                    save(step)
            if recipe.checkpoint.save_on_exit and last_saved != step:
                save(step)
            ckpt.wait()
    finally:
        ckpt.close()
        metrics_log.close()
        it.close()
    summary.update(end_step=step, first_loss=first_loss, last_loss=last_loss, last_saved=last_saved,
                   skipped=train_state["skipped_total"])
    out(f"done: step {step}" + (f", loss {first_loss:.4f} -> {last_loss:.4f}" if first_loss is not None else "")
        + (f", checkpoint step {last_saved} in {ckpt.directory}" if last_saved is not None else ""))
    return summary


def _load_init(directory: str, abstract: dict) -> dict:
    """Every variable of a model checkpoint (glm5_jax.checkpoint layout; a converted HF model or another run's
    training checkpoint) restored straight into this run's shardings."""
    import orbax.checkpoint as ocp

    reader = CheckpointReader(directory)
    missing = sorted(set(abstract) - set(reader.names))
    if missing:
        raise ConfigError(f"init_from: {reader.directory} lacks variables this model needs, e.g. {missing[0]}")
    target = _nest(abstract)
    with ocp.CheckpointManager(reader.directory, item_handlers={"params": ocp.PyTreeCheckpointHandler()}) as mngr:
        restored = mngr.restore(reader.step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target))))["params"]
    return unflatten(restored)
