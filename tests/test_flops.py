"""The analytic FLOP model (glm5_jax/accounting/analytic.py): a pure function of the config and the layout's numbers,
which asks the model which expert kernels run. Checked against the program the model actually lowers to."""

from __future__ import annotations

import ast
import inspect

import jax
import pytest

from glm5_jax import config
from glm5_jax.accounting import analytic as F
from glm5_jax.sharding.context import Parallelism
from glm5_jax.sharding.layout import load_layout

# One dense and two MoE layers (the pipeline needs one per stage), no MTP: tracing (no compile) takes seconds.
MODEL = ["num_hidden_layers=3", "first_k_dense_replace=1", "num_nextn_predict_layers=0"]
QUICKSTART = {"mesh": {"pipeline": 2, "expert": 2, "tensor": 2}, "microbatches": 2}  # configs/recipes/quickstart


def _primitives(cfg, par, rows: int, seq: int) -> set[str]:
    """Names of every primitive a MoE layer traces to under layout `par` (sub-programs included)."""
    from flax import nnx

    from glm5_jax.model.moe import MoE
    from glm5_jax.sharding.context import use

    moe = MoE(cfg, stack=None, rngs=nnx.Rngs(0))
    names = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            names.add(eqn.primitive.name)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    with use(par):
        walk(jax.make_jaxpr(lambda x: moe(x))(jax.ShapeDtypeStruct((rows, seq, cfg.hidden_size), "float32")).jaxpr)
    return names


@pytest.mark.parametrize("layout,matmul,dispatch", [
    (QUICKSTART, "ragged_dot", "capacity"),  # pipeline x expert: ragged_dot even on CPU (the old plan said tiled)
    ("ep4-dp2", "tiled", "capacity"),
    ("dp8", "tiled", None),
])
def test_the_flop_model_runs_what_the_model_runs(layout, matmul, dispatch):
    cfg = config.load("tiny", MODEL)
    par = Parallelism.create(load_layout(None, layout) if isinstance(layout, dict) else load_layout(layout),
                             jax.devices()[:8])
    work = F.work_of(cfg, par)
    assert (work.expert_matmul, work.dispatch) == (matmul, dispatch)
    primitives = _primitives(cfg, par, 8, 32)
    assert ("ragged_dot_general" in primitives) == (matmul == "ragged_dot"), primitives
    assert ("all_to_all" in primitives) == (dispatch is not None) and "ragged_all_to_all" not in primitives


def test_expert_tiles_by_hand():
    cfg = config.load("tiny")  # k = 2 of E = 8 experts, 64-row tiles
    work = F.Work(devices=8, split=2, batch_shards=2, expert_shards=4, expert_matmul="tiled", dispatch="capacity")
    # 16 rows x 32 tokens per microbatch: 512 copies per device, dropless capacity 512 per source, 4 sources,
    # 2 local experts: ceil((2048 + 2 * 63) / 64) = 34 tiles.
    assert F.expert_tiles(cfg, work, 16 * 32) == (64, 34)
    capped = F.Work(**{**work.__dict__, "capacity_factor": 1.25})  # ceil(1.25 * 512 / 4) = 160 per source
    assert F.expert_tiles(cfg, capped, 16 * 32) == (64, -(-(4 * 160 + 2 * 63) // 64))
    ragged = F.Work(**{**work.__dict__, "expert_matmul": "ragged_dot", "dispatch": "ragged"})
    assert F.expert_tiles(cfg, ragged, 16 * 32) == (0, 1)
    # The step's MoE loop trips: tiles of one microbatch (32 rows as 2 microbatches), x the accumulation loop.
    routed = next(f for f in F.analytic_flops(cfg, work, 32, 32, accumulate=2) if f.name.startswith("MoE routed"))
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    assert routed.loops == moe_layers * 34 * 2
    assert routed.flops == 6 * 32 * 32 * cfg.num_experts_per_tok * 3 * cfg.hidden_size * cfg.moe_intermediate_size \
        * moe_layers


def test_dsa_modes_count_their_attention():
    cfg = config.load("tiny")  # index_topk 16: 64-token rows take the sparse path, in the warm-up dense
    work = F.Work()
    names = lambda mode: {f.name: f.flops for f in F.analytic_flops(cfg, work, 2, 64, dsa_mode=mode)}
    sparse, warmup, adapt = names("sparse"), names("warmup"), names("sparse_adapt")
    assert "attention core (sparse, top-k)" in sparse and "attention core (dense, full L x L)" in warmup
    # 2 rows of 64: 128 queries in blocks of 16, 8 heads of 16 (+1: the weights), 4 layers with an indexer
    per_key = 2 * 128 * 8 * 17 * 4
    scores = lambda counts: counts["indexer scores (selection, KL)"]
    assert scores(sparse) == per_key * 16 * (1 + 2 + 3 + 4) / 4  # the blocks' causal chunks of 16 keys, forward
    assert scores(adapt) == scores(sparse) + 3 * per_key * 16  # + the KL over the 16 selected keys, trained
    assert scores(warmup) == 3 * per_key * 64  # the KL over every key, trained; no selection


def test_the_module_is_pure_and_the_trainer_uses_it():
    tree = ast.parse(inspect.getsource(F))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.split(".")[0] in ("jax", "jaxlib", "flax", "numpy") for m in imported), imported
    cfg = config.load("tiny")
    par = Parallelism.create(load_layout("ep4-dp2"), jax.devices()[:8])
    assert F.model_flops_per_step(cfg, par, 16, 32, 3) == F.model_flops(cfg, F.work_of(cfg, par), 16, 32, 3)
    # The MFU of a DSA stage counts its own attention (the warm-up attends densely above index_topk).
    assert F.model_flops_per_step(cfg, par, 16, 64, 3, "warmup") == F.model_flops(
        cfg, F.work_of(cfg, par), 16, 64, 3, dsa_mode="warmup") != F.model_flops_per_step(cfg, par, 16, 64, 3)


def test_dense_mode_counts_the_key_blocks_it_computes():
    """`dsa: dense` counts no indexer and, per query block, the key blocks the model's loop bounds give
    (`flash.key_block_range` of one-document rows), on one device and per context shard; the TPU count is the
    splash kernel's expanded form over its causal tiles."""
    import numpy as np

    from glm5_jax.model import flash

    cfg = config.load("tiny")  # query block 16
    H, C, dr = cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    for seq, context in ((88, 1), (88, 4), (64, 2)):
        local, block = seq // context, min(16, seq // context)
        pairs = 0
        for s in range(context):
            rows = np.arange(s * local, (s + 1) * local)
            for i in range(0, local, block):
                lo, hi = flash.key_block_range(rows[i:i + block], np.zeros(block, np.int32)[:len(rows[i:i + block])],
                                               block)
                pairs += (int(hi) - int(lo) + 1) * block * block
        work = F.Work(context=context)
        parts = {f.name: f for f in F.analytic_flops(cfg, work, 2, seq, dsa_mode="dense")}
        core = parts["attention core (dense, blocked, causal blocks)"]
        assert core.flops == 2 * pairs * 6 * H * (2 * C + dr) * cfg.num_hidden_layers
        assert pairs < seq * seq and not any("indexer" in name for name in parts)
    splash = {f.name: f.flops for f in F.analytic_flops(cfg, F.Work(platform="tpu"), 1, 256, dsa_mode="dense")}
    assert "attention core (dense, blocked, causal blocks)" in splash  # the tiny heads are not 128 wide
    big = config.load("tiny", ["qk_nope_head_dim=64", "qk_rope_head_dim=64", "v_head_dim=128", "index_head_dim=64"])
    tpu = {f.name: f.flops for f in F.analytic_flops(big, F.Work(platform="tpu"), 1, 1024, dsa_mode="dense")}
    assert tpu["attention core (dense, splash kernel)"] == 6 * 3 * 512 * 512 * big.num_attention_heads * 256 \
        * big.num_hidden_layers  # 512-wide tiles (0,0), (1,0), (1,1)
    # Short rows (one block) take the full L x L path.
    assert "attention core (dense, full L x L)" in {f.name for f in F.analytic_flops(cfg, F.Work(), 2, 16,
                                                                                     dsa_mode="dense")}
