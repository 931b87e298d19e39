"""The analytic FLOP count of one train step: a pure function of the model config and the layout's numbers.

Used by `glm5 plan` (the per-component table next to XLA's cost analysis), `glm5 bench` (against the compiled
count, glm5_jax/accounting/compiled.py) and the trainer's MFU (`model_flops_per_step`). Nothing here calls JAX:
the layout enters as plain numbers (`Work`), and the expert kernels as the model's own choice
(`glm5_jax.model.moe.expert_matmul_kind`, `glm5_jax.sharding.expert.dispatch_kind` / `received_rows`, pure
functions the model runs by), so the count and the compiled program cannot disagree on which loop runs.

Matrix multiplies only, 2 FLOPs per multiply-add. T = batch * seq tokens. A weight W applied to every token
costs 2|W|T forward and 4|W|T backward (input and weight gradients): 6|W|T. Per layer (D hidden, H heads,
ql/C q/kv LoRA ranks, dn/dr/dv nope/rope/value head dims, K = index_topk, Hi/Di indexer heads/dim):

- attention projections: 6T(D ql + ql H (dn+dr) + D (C+dr) + C H (dn+dv) + H dv D)
- attention core, dense (seq <= K, and every length in the DSA warm-up; full L x L scores, masked, as
  computed): 6 B L^2 H (dn+dr+dv)
- attention core, `dsa: dense` (no indexer at any length; one document per row): above one query block of
  `attention_query_block` (b) queries, the key blocks each query block computes (`dense_pairs`: those up
  to its diagonal, about half the square), P query-key pairs a row: blocked in absorbed form
  6 B P H (2C + dr); with the TPU splash kernel (`model.flash.dense_kernel`, b = 512) in expanded form
  6 B P H (dn+dr+dv). Up to one block: the dense row above.
- attention core, sparse (seq > K; absorbed MLA over K gathered latents): 6 Tq H K (2C + dr), Tq = queries
  padded to whole query blocks
- indexer ('full' layers, whenever it runs: seq > K, or a DSA training mode): projections
  2T(ql Hi Di + D Di + D Hi), forward only in plain training (its output is integer top-k indices: no
  gradient flows back), x3 in the DSA warm-up and sparse adaptation, where its KL trains it. Scores
  (`indexer_scores`): the top-k selection of the sparse modes, forward only, 2 Tq S Hi (Di + 1), S the keys a
  query block scores (`scored_chunks`: the chunks of max(K, b) keys up to its last query, about half of L);
  the KL, forward and backward, 3 x 2 Tq L Hi (Di + 1) over every key in the warm-up and 3 x 2 Tq K Hi (Di + 1)
  over the selected keys in sparse adaptation.
- dense FFN: 6T * 3 D I;  MoE: router 6T D E, routed experts 6T k 3 D F, shared expert 6T 3 D Fs
- output head: 6T D V. The embedding is a gather (0).
- MTP (`mtp_depths` > 0), per depth: eh_proj 6T 2D D, one MoE decoder layer (its attention, indexer,
  router and experts as above) and the output head again.
- Muon Newton-Schulz (per matrix m x n, m <= n, per iteration): 4 m^2 n + 2 m^3
- `dsa: dense`'s blocks (hardware, not model FLOPs): each query block is rematerialised and the key loop's
  backward recomputes the scores: B P H (6C+4dr) + 2T(ql H(dn+dr) + C H(dn+dv)) per layer (`dense_recompute`).
- rematerialisation (hardware, not model FLOPs): the forward work the policy recomputes in backward
  (`full`: every layer's forward; `save_dots_no_batch`: the batched einsums of the attention core, the
  indexer scores and the absorbed kv_b products; `save_dots`/`none`: nothing).

Norms, softmax, RoPE and other elementwise work is not counted.
"""

from __future__ import annotations

import dataclasses
import math

from glm5_jax.model.flash import SPLASH_BLOCK, dense_kernel
from glm5_jax.model.moe import expert_matmul_kind
from glm5_jax.model.transformer import layer_groups
from glm5_jax.sharding.expert import dispatch_kind, received_rows
from glm5_jax.sharding.runners import runners


@dataclasses.dataclass(frozen=True)
class Work:
    """How a layout divides one step's work, as plain numbers (see `work_of`)."""

    devices: int = 1
    split: int = 1  # ways the model's work divides: batch x context x tensor shards (x pipeline stages)
    batch_shards: int = 1
    context: int = 1  # shards of the sequence
    expert_shards: int = 1  # devices the routed experts are spread over (1: no expert parallelism)
    pipeline_microbatches: int = 1  # microbatches each pipeline stage runs per accumulation microbatch
    expert_matmul: str = "ragged_dot"  # what the MoE runs: "tiled" (a loop over row tiles) or "ragged_dot"
    dispatch: str | None = None  # expert-parallel exchange: "capacity" | "ragged"; None without one
    capacity_factor: float | None = None
    platform: str = "cpu"  # what the program is compiled for (the dense attention kernel depends on it)


def work_of(cfg, par, params=None) -> Work:
    """The `Work` of `par` (a `glm5_jax.sharding.context.Parallelism`) for model config `cfg`.

    `params`: {name: array or ShapeDtypeStruct with a NamedSharding}; when some are sharded over `pipeline`
    the pipeline stages divide the work too. Without them, a pipeline mesh axis is assumed to be in effect.
    """
    mesh = dict(par.mesh.shape)
    run = runners(par)
    stages, experts = run.pipeline_stages, run.expert_shards
    split = par.axis_size("batch") * par.axis_size("length") * mesh.get("tensor", 1)
    pipelined = mesh.get("pipeline", 1) > 1 and (params is None or any(
        "pipeline" in _spec_axes(x.sharding.spec) for x in params.values()))
    if pipelined:
        split *= mesh["pipeline"]
    return Work(devices=par.mesh.size, split=min(split, par.mesh.size), batch_shards=par.axis_size("batch"),
                context=par.axis_size("length"), expert_shards=experts,
                pipeline_microbatches=par.config.microbatches if stages > 1 else 1,
                expert_matmul=expert_matmul_kind(cfg.expert_matmul, run.platform, stages, experts),
                dispatch=dispatch_kind(par.config.expert_dispatch, par.platform) if experts > 1 else None,
                capacity_factor=par.config.capacity_factor, platform=par.platform)


def _spec_axes(spec) -> set:
    out = set()
    for entry in spec:
        out.update((entry,) if isinstance(entry, str) else entry or ())
    return out


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


def attention_shape(cfg, batch: int, seq: int, context: int, dsa_mode: str = "sparse"):
    """(sparse?, padded query count, query blocks per sequence shard) as mla/dsa run them."""
    if seq <= cfg.index_topk:
        return False, batch * seq, 1
    local = seq // context
    block = min(cfg.attention_query_block, local)
    blocks = -(-local // block)
    return dsa_mode not in ("warmup", "dense"), batch * context * blocks * block, blocks


def dense_pairs(seq: int, context: int, block: int) -> int:
    """Query-key pairs one row of `seq` tokens (one document) computes in `dsa: dense`'s blocks: each query
    block of each of `context` sequence shards (padded to whole blocks) x the key blocks up to its last query."""
    local = seq // context
    block = min(block, local)
    last = [min(i + block, local) - 1 for i in range(0, local, block)]
    return sum(((s * local + q) // block + 1) * block * block for s in range(context) for q in last)


def scored_chunks(seq: int, topk: int, block: int, context: int = 1) -> float:
    """Mean key chunks (of max(topk, block) keys) DSA's top-k selection scores per query block of `block`
    queries, over the blocks of all `context` sequence shards: the chunks up to the block's last query
    (`model.dsa.select_topk`; query positions are the row positions 0..seq-1)."""
    local = seq // context
    chunk = max(topk, block)
    n_chunks = -(-seq // chunk)
    block = min(block, local)
    needed = [min((s * local + min(q + block, local) - 1) // chunk + 1, n_chunks)
              for s in range(context) for q in range(0, local, block)]
    return sum(needed) / len(needed)


def indexer_scores(cfg, batch: int, seq: int, context: int, dsa_mode: str) -> tuple[float, float, str]:
    """(forward FLOPs, forward + backward FLOPs, formula) of one full layer's indexer scores when it runs:
    the sparse modes' top-k selection (forward only) and the KL of the DSA modes (trained)."""
    sparse, Tq, _ = attention_shape(cfg, batch, seq, context, dsa_mode)
    K, b = cfg.index_topk, cfg.attention_query_block
    per_key = 2 * Tq * cfg.index_n_heads * (cfg.index_head_dim + 1)
    select = per_key * scored_chunks(seq, K, b, context) * max(K, b) if sparse else 0.0
    kl_keys = {"warmup": seq, "sparse_adapt": K}.get(dsa_mode, 0)
    formula = " + ".join((["2 Tq S Hi (Di+1)"] if sparse else [])
                         + ([f"3 x 2 Tq {'L' if dsa_mode == 'warmup' else 'K'} Hi (Di+1)"] if kl_keys else []))
    return select + per_key * kl_keys, select + 3 * per_key * kl_keys, formula


def dense_core(cfg, work: Work, batch: int, seq: int) -> tuple[str, str, float, float]:
    """(name, formula, FLOPs per layer, loop trips a cost analysis folds) of `dsa: dense`'s attention core."""
    H, C, dn, dr, dv = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                        cfg.v_head_dim)
    if seq <= cfg.attention_query_block:
        full = 6 * batch * seq * seq * H * (dn + dr + dv)
        return "attention core (dense, full L x L)", "6 B L^2 H (dn+dr+dv)", full, 1
    if dense_kernel(work.platform, work.context, seq, (dn + dr, dv)) == "splash":
        pairs = dense_pairs(seq, 1, SPLASH_BLOCK)
        return "attention core (dense, splash kernel)", "6 B P H (dn+dr+dv)", 6 * batch * pairs * H * (dn + dr + dv), 1
    block = min(cfg.attention_query_block, seq // work.context)
    pairs = dense_pairs(seq, work.context, block)
    # XLA's cost analysis sees one key block of one query block of each device (both loops fold).
    return ("attention core (dense, blocked, causal blocks)", "6 B P H (2C+dr)", 6 * batch * pairs * H * (2 * C + dr),
            pairs / (work.context * block * block))


def dense_recompute(cfg, work: Work, batch: int, seq: int) -> float:
    """FLOPs per layer `dsa: dense`'s blocked path computes again in the backward (hardware, not model FLOPs):
    each query block's forward under its remat (queries, the key absorption, the core and w_uv; o_proj's output
    is not needed again) and, in the key loop's backward, the scores: B P H (6C+4dr) + 2T(ql H(dn+dr) +
    C H(dn+dv)). 0 for the splash kernel and for rows of one block."""
    H, C, dn, dr, dv = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                        cfg.v_head_dim)
    if seq <= cfg.attention_query_block or dense_kernel(work.platform, work.context, seq, (dn + dr, dv)) == "splash":
        return 0.0
    pairs = dense_pairs(seq, work.context, min(cfg.attention_query_block, seq // work.context))
    per_token = cfg.q_lora_rank * H * (dn + dr) + C * H * (dn + dv)
    return batch * pairs * H * (6 * C + 4 * dr) + 2 * batch * seq * per_token


def expert_tiles(cfg, work: Work, tokens: int) -> tuple[int, int]:
    """(tile rows, tiles per device of one MoE call over `tokens` tokens); (0, 1) when ragged_dot runs.

    With expert parallelism each device runs the rows it receives (`received_rows`, the dispatch's buffer)
    through its local experts; without, the call's rows through all experts.
    """
    if work.expert_matmul != "tiled":
        return 0, 1
    k, E = cfg.num_experts_per_tok, cfg.n_routed_experts
    if work.dispatch is not None:
        local_copies = tokens * k // max(1, work.batch_shards * work.context)
        rows = received_rows(work.dispatch, local_copies, work.expert_shards, work.capacity_factor)
        experts = E // work.expert_shards
    else:
        rows, experts = tokens * k, E
    return cfg.expert_tile, -(-(rows + experts * (cfg.expert_tile - 1)) // cfg.expert_tile)


def analytic_flops(cfg, work: Work, batch: int, seq: int, routes: dict | None = None, opt_cfg=None,
                   shards: dict[str, int] | None = None, mtp_depths: int = 0, accumulate: int = 1,
                   dsa_mode: str = "sparse") -> list[Flops]:
    """Per-component FLOPs of one train step of `batch` rows of `seq` tokens run as `accumulate` microbatches
    (the formulas: this module's docstring). `routes` / `opt_cfg`: Muon's routing (`optim.param_routes`) and
    settings, for the Newton-Schulz rows (omitted without them); `shards`: parameter name -> shard count,
    for what one device orthogonalises. The accumulation loop's body is what a cost analysis counts once:
    every model part's `loops` grows by `accumulate`.
    """
    D, H, V = cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size
    ql, C, dn, dr, dv = cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    Hi, Di, K = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk
    T = batch * seq
    sparse, Tq, blocks = attention_shape(cfg, batch, seq, work.context, dsa_mode)
    w_attn = D * ql + ql * H * (dn + dr) + D * (C + dr) + C * H * (dn + dv) + H * dv * D
    core = 6 * Tq * H * K * (2 * C + dr) if sparse else 6 * batch * seq * seq * H * (dn + dr + dv)
    core_name = "attention core (sparse, top-k)" if sparse else "attention core (dense, full L x L)"
    core_formula, core_loops = "6 Tq H K (2C+dr) x layers" if sparse else "6 B L^2 H (dn+dr+dv) x layers", blocks
    if dsa_mode == "dense":
        core_name, core_formula, core, core_loops = dense_core(cfg, work, batch, seq)
        core_formula += " x layers"
    indexer_runs = sparse or (dsa_mode in ("warmup", "sparse_adapt") and seq > K)
    trains = 3 if dsa_mode in ("warmup", "sparse_adapt") else 1  # the DSA modes differentiate the indexer's KL
    idx_proj = 2 * T * (ql * Hi * Di + D * Di + D * Hi)
    idx_forward, idx_scores, idx_formula = indexer_scores(cfg, batch, seq, work.context, dsa_mode)
    micro_tokens = batch // accumulate // work.pipeline_microbatches * seq
    _, tiles = expert_tiles(cfg, work, micro_tokens)
    groups = layer_groups(cfg)
    n_all = sum(g.count for g in groups)
    n_moe = sum(g.count for g in groups if g.moe)
    n_idx = sum(g.count for g in groups if g.indexer)
    # Loop trips XLA counts once: one scan per layer group (the longest is the bound that matters).
    scan = max(g.count for g in groups)
    dense_scan = max((g.count for g in groups if not g.moe), default=1)
    moe_scan = max((g.count for g in groups if g.moe), default=1)

    def part(name, formula, flops, loops=1):  # a model component, divided like the model's work
        return Flops(name, formula, flops, flops / work.split, loops * accumulate)

    out = [
        part("attention projections", "6T(D ql + ql H(dn+dr) + D(C+dr) + C H(dn+dv) + H dv D) x layers",
             6 * T * w_attn * n_all, scan),
        part(core_name, core_formula, core * n_all, scan * core_loops),
    ]
    if indexer_runs and n_idx:
        how = "fwd + bwd (DSA training)" if trains == 3 else "fwd only"
        out += [part(f"indexer projections ({how})", f"{trains} x 2T(ql Hi Di + D Di + D Hi) x full layers",
                     trains * idx_proj * n_idx, scan),
                part("indexer scores (selection, KL)", f"({idx_formula}) x full layers", idx_scores * n_idx,
                     scan * blocks)]
    k, Fe, E, Fs = cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.n_routed_experts, \
        cfg.shared_intermediate_size
    if n_all - n_moe:
        out.append(part("dense FFN", "6T 3 D I x dense layers",
                        6 * T * 3 * D * cfg.intermediate_size * (n_all - n_moe), dense_scan))
    if n_moe:
        out += [part("MoE router", "6T D E x MoE layers", 6 * T * D * E * n_moe, moe_scan),
                part("MoE routed experts (active)", "6T k 3 D F x MoE layers", 6 * T * k * 3 * D * Fe * n_moe,
                     moe_scan * tiles),
                part("MoE shared expert", "6T 3 D Fs x MoE layers", 6 * T * 3 * D * Fs * n_moe, moe_scan)]
    out.append(part("output head", "6T D V", 6 * T * D * V))
    if mtp_depths:
        layer = 6 * T * (w_attn + 2 * D * D + D * E + 3 * D * (k * Fe + Fs) + D * V) + core + \
            (trains * idx_proj + idx_scores if indexer_runs else 0)
        out.append(part("MTP", "depths x (6T(attn + 2D D + D E + 3D(k F + Fs) + D V) + core (+ indexer))",
                        mtp_depths * layer, mtp_depths * core_loops))
    ns = newton_schulz_flops(routes, opt_cfg) if routes and opt_cfg is not None else 0.0
    if ns:
        ns_device = newton_schulz_flops(routes, opt_cfg, shards) if shards else ns / work.devices
        loops = ns / newton_schulz_flops(routes, opt_cfg, once=True)
        out.append(Flops("Muon Newton-Schulz", f"{opt_cfg.ns_steps} x (4 m^2 n + 2 m^3) per matrix", ns, ns_device,
                         loops, model=False))
    indexer = (idx_proj + idx_forward) * n_idx if indexer_runs else 0.0
    remat = remat_flops(cfg, core, indexer, idx_forward * n_idx if indexer_runs else 0.0, sparse, T, w_attn,
                        n_all, n_moe)
    if dsa_mode == "dense" and (again := dense_recompute(cfg, work, batch, seq) * (n_all + mtp_depths)):
        out.append(Flops("dense attention blocks' recompute", "B P H (6C+4dr) + 2T(ql H(dn+dr) + C H(dn+dv)) x layers",
                         again, again / work.split, scan * core_loops * accumulate, model=False))
    if remat:
        out.append(Flops(f"remat recompute ({cfg.remat_policy})", "forward work the policy recomputes", remat,
                         remat / work.split, scan * (blocks if cfg.remat_policy != "full" else 1) * accumulate,
                         model=False))
    return out


def model_flops(cfg, work: Work, batch: int, seq: int, mtp_depths: int = 0, accumulate: int = 1,
                dsa_mode: str = "sparse") -> float:
    """Model FLOPs of one step (all devices): the model parts of `analytic_flops` (the trainer's MFU)."""
    return float(sum(f.flops for f in analytic_flops(cfg, work, batch, seq, mtp_depths=mtp_depths,
                                                     accumulate=accumulate, dsa_mode=dsa_mode) if f.model))


def model_flops_per_step(cfg, par, batch: int, seq: int, mtp_depths: int = 0, dsa_mode: str = "sparse") -> float:
    """Analytic model FLOPs of one train step (all devices) on layout `par`: the trainer's MFU numerator, in the
    stage's DSA mode (the warm-up attends densely at every length and differentiates the indexer's KL)."""
    return model_flops(cfg, work_of(cfg, par), batch, seq, mtp_depths=mtp_depths, dsa_mode=dsa_mode)


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


def remat_flops(cfg, core, indexer, idx_scores, sparse, T, w_attn, n_all, n_moe) -> float:
    """Forward FLOPs recomputed in the backward pass under cfg.remat_policy (see the module docstring).
    `indexer`: the indexer's forward FLOPs over all its layers; `idx_scores`: the scores' part of it."""
    policy = cfg.remat_policy
    if policy in ("none", "save_dots"):
        return 0.0
    D = cfg.hidden_size
    if policy == "full":
        ffn = (3 * D * cfg.intermediate_size * (n_all - n_moe)
               + (D * cfg.n_routed_experts + cfg.num_experts_per_tok * 3 * D * cfg.moe_intermediate_size
                  + 3 * D * cfg.shared_intermediate_size) * n_moe)
        return 2 * T * (w_attn * n_all + ffn) + core / 3 * n_all + indexer
    absorbed = 2 * T * cfg.kv_lora_rank * cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return core / 3 * n_all + (idx_scores + absorbed * n_all if sparse else 0.0)


def active_params(cfg) -> int:
    """Parameters multiplied per token in the main model (no embedding gather, no MTP): N in 6 N T."""
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


def shard_counts(shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, int]:
    """Parameter name -> how many shards its sharding cuts it into, from {name: (shape, shard shape)}."""
    return {name: math.prod(shape) // max(1, math.prod(local)) for name, (shape, local) in shapes.items()}
