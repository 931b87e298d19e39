"""The GLM-5 decoder: embedding, scanned stacks of decoder layers, final norm, untied head, and MTP."""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from glm5_jax import scopes
from glm5_jax.model.mla import MLA
from glm5_jax.model.moe import MoE, SwiGLU
from glm5_jax.model.norms import RMSNorm
from glm5_jax.model.params import make_param
from glm5_jax.model.rope import inverse_frequencies, rope_angles
from glm5_jax.sharding import pipeline
from glm5_jax.sharding.context import constrain
from glm5_jax.sharding.runners import runners

HIDDEN = ("batch", "length", "act_embed")  # logical axes of the residual stream

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.checkpoint_dots,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """A run of consecutive layers of one kind, stored stacked and run with one scan."""

    start: int
    count: int
    moe: bool
    indexer: bool

    @property
    def layers(self) -> range:
        return range(self.start, self.start + self.count)


def layer_groups(cfg) -> list[LayerGroup]:
    """Split layers into maximal runs with the same FFN kind (dense/MoE) and indexer kind (full/shared)."""
    groups: list[LayerGroup] = []
    for i in range(cfg.num_hidden_layers):
        moe, indexer = cfg.mlp_layer_types[i] == "sparse", cfg.indexer_types[i] == "full"
        last = groups[-1] if groups else None
        if last and (last.moe, last.indexer) == (moe, indexer):
            groups[-1] = dataclasses.replace(last, count=last.count + 1)
        else:
            groups.append(LayerGroup(i, 1, moe, indexer))
    return groups


def pipelined_group(groups) -> int:
    """Index of the layer group that runs as a pipeline under a pipeline layout: the last MoE group (the last
    group if none is). Layers after it must not read its top-k (`layout_check` checks)."""
    moe = [i for i, g in enumerate(groups) if g.moe]
    return moe[-1] if moe else len(groups) - 1


def layer_range_name(name: str, cfg) -> str:
    """`layers.1.mlp.gate` -> `layers[3-77].mlp.gate`: a stack's index replaced by the layers it holds."""
    parts = name.split(".")
    if parts[0] == "layers":
        g = layer_groups(cfg)[int(parts[1])]
        parts[:2] = [f"layers[{g.start}]" if g.count == 1 else f"layers[{g.start}-{g.start + g.count - 1}]"]
    return ".".join(parts)


class LayerStats(NamedTuple):
    """Per-layer training statistics, stacked over layers by the layer scan; None where a layer has none.

    Every field is a sum over batch rows (and queries), so microbatch results add up (sharding/pipeline.py).
    """

    load: jax.Array | None = None  # [E] int32 tokens processed per expert (MoE layers)
    balance: jax.Array | None = None  # float32 sum over rows of sum_i f_i P_i (moe.sequence_balance)
    indexer_kl: jax.Array | None = None  # float32 sum over real queries of KL(p || softmax(I)); DSA training


class DecoderLayer(nnx.Module):
    """Pre-norm block: h += MLA(norm(h)); h += FFN(norm(h))."""

    def __init__(self, cfg, *, moe: bool, indexer: bool, stack: int | None, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axis="embed", stack=stack, param_dtype=pd)
        self.self_attn = MLA(cfg, has_indexer=indexer, stack=stack, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axis="embed", stack=stack,
                                                param_dtype=pd)
        self.moe = moe
        self.mlp = MoE(cfg, stack=stack, rngs=rngs) if moe else SwiGLU(cfg, cfg.intermediate_size, stack=stack,
                                                                      rngs=rngs)

    def __call__(self, h, cos, sin, segment_ids, topk_idx, dsa_mode: str = "sparse"):
        """-> (h, top-k indices, LayerStats)."""
        return self.forward(h, cos, sin, segment_ids, topk_idx, dsa_mode)[:3]

    def forward(self, h, cos, sin, segment_ids, topk_idx, dsa_mode: str = "sparse", *, with_cache: bool = False):
        """`__call__`'s results plus, with `with_cache`, the attention's decode-cache entries (MLA.forward)."""
        h = constrain(h, HIDDEN)
        with jax.named_scope(scopes.ATTENTION):
            a, topk_idx, kl, cache = self.self_attn.forward(self.input_layernorm(h), cos, sin, segment_ids,
                                                            topk_idx, dsa_mode, with_cache=with_cache)
        h = h + a
        x = self.post_attention_layernorm(h)
        if self.moe:
            y, load, balance = self.mlp(x, segment_ids, with_balance=True)
        else:
            y, load, balance = self.mlp(x), None, None
        return h + y, topk_idx, LayerStats(load, balance, kl), cache

    def decode(self, h, cos, sin, positions, latent, index_keys, topk_idx):
        """The layer on new tokens h [B, Q, D] at `positions` over its decode cache (MLA.decode).

        -> (h, top-k indices, latent, index_keys)."""
        h = constrain(h, HIDDEN)
        a, topk_idx, latent, index_keys = self.self_attn.decode(self.input_layernorm(h), cos, sin, positions,
                                                                latent, index_keys, topk_idx)
        h = h + a
        x = self.post_attention_layernorm(h)
        y = self.mlp(x)[0] if self.moe else self.mlp(x)
        return h + y, topk_idx, latent, index_keys


def scan_layers(graphdef, state, h, cos, sin, segment_ids, topk_idx, remat_policy: str, dsa_mode: str = "sparse"):
    """Run a split stack of DecoderLayers with lax.scan: `state` holds the stacked variables (leading `layers`
    axis). -> (h, topk_idx, LayerStats stacked over the group's layers)."""

    def body(carry, layer_state):
        h, topk_idx = carry
        h, topk_idx, stats = nnx.merge(graphdef, layer_state)(h, cos, sin, segment_ids, topk_idx, dsa_mode)
        return (h, topk_idx), stats

    if remat_policy != "none":
        body = jax.checkpoint(body, policy=REMAT[remat_policy], prevent_cse=False)
    (h, topk_idx), stats = jax.lax.scan(body, (h, topk_idx), state)
    return h, topk_idx, stats


class MTP(nnx.Module):
    """Multi-token prediction: one parameter set applied at several depths.

    Depth k: h_k = Layer(eh_proj([enorm(embed(token[t+k])) ; hnorm(h_{k-1})])), logits_k =
    head(shared_head.norm(h_k)) predict token t+k+1. h_0 is the main model's final-normed hidden state
    (what vLLM and SGLang feed their GLM/DeepSeek MTP layer); depth k > 1 continues from h_k before
    shared_head.norm. Embedding and output head are the main model's.
    """

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        D = cfg.hidden_size
        self.dtype = jnp.dtype(cfg.dtype)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, axis="embed", stack=None, param_dtype=pd)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, axis="embed", stack=None, param_dtype=pd)
        self.eh_proj = make_param(rngs, (2 * D, D), ("mtp_concat", "embed"), stack=None, dtype=pd, std=std)
        self.layer = DecoderLayer(cfg, moe=True, indexer=True, stack=None, rngs=rngs)
        self.shared_head_norm = RMSNorm(D, cfg.rms_norm_eps, axis="embed", stack=None, param_dtype=pd)

    def combine(self, h_prev, token_embeds):
        x = jnp.concatenate([self.enorm(token_embeds), self.hnorm(h_prev)], axis=-1)
        with jax.named_scope(scopes.MTP_PROJECTION):
            return x @ self.eh_proj[...].astype(self.dtype)

    def step(self, h_prev, token_embeds, cos, sin, segment_ids, dsa_mode: str = "sparse", *,
             with_cache: bool = False):
        """One depth over a whole sequence -> (h, normed h, LayerStats); with `with_cache` also the layer's
        decode-cache entries (MLA.forward)."""
        h, _, stats, cache = self.layer.forward(self.combine(h_prev, token_embeds), cos, sin, segment_ids, None,
                                                dsa_mode, with_cache=with_cache)
        if with_cache:
            return h, self.shared_head_norm(h), stats, cache
        return h, self.shared_head_norm(h), stats

    def decode(self, h_prev, token_embeds, cos, sin, positions, latent, index_keys):
        """One depth on new positions over this depth's decode cache -> (h, normed h, latent, index_keys)."""
        h, _, latent, index_keys = self.layer.decode(self.combine(h_prev, token_embeds), cos, sin, positions,
                                                     latent, index_keys, None)
        return h, self.shared_head_norm(h), latent, index_keys


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, L, V] float32
    mtp_logits: jax.Array | None  # [depths, B, L, V] float32; depth k at t predicts token t + k + 1
    expert_load: jax.Array | None  # [MoE layers, E] tokens routed to each expert (main stack)
    # Per-layer statistics of the main stack, each field concatenated over the layers that have it
    # (load, balance: MoE layers in order; indexer_kl: layers with an indexer, only in DSA training modes).
    stats: LayerStats | None = None
    mtp_stats: LayerStats | None = None  # the MTP layer's, stacked over depths [depths, ...]; None without MTP
    # With `logits=False` (the training loss, which runs the head in blocks): the final normed hidden states
    # the head reads, [B, L, D], and MTP's [depths, B, L, D]; logits and mtp_logits are then None.
    hidden: jax.Array | None = None
    mtp_hidden: jax.Array | None = None


class GLM5(nnx.Module):
    """GLM-5 causal LM (transformers' GlmMoeDsaForCausalLM) with its MTP head."""

    def __init__(self, cfg, *, rngs: nnx.Rngs):
        cfg.validate()
        pd, std = jnp.dtype(cfg.param_dtype), cfg.initializer_range
        self.cfg, self.dtype = cfg, jnp.dtype(cfg.dtype)
        self.embed_tokens = make_param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), stack=None,
                                       dtype=pd, std=std)
        self.layers = nnx.List([DecoderLayer(cfg, moe=g.moe, indexer=g.indexer, stack=g.count, rngs=rngs)
                                for g in layer_groups(cfg)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, axis="embed", stack=None, param_dtype=pd)
        self.lm_head = make_param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), stack=None,
                                  dtype=pd, std=std)
        self.mtp = MTP(cfg, rngs=rngs) if cfg.has_mtp else None

    def embed(self, ids):
        # Gather the table's model dimension first (like any FSDP weight): a lookup into a table sharded on
        # `embed` yields rows split by feature, which GSPMD can only turn into batch-sharded rows by
        # replicating the whole [B, L, D] result.
        table = constrain(self.embed_tokens[...], ("vocab", "act_embed"))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def rope(self, positions):
        """RoPE cos and sin [B, L, qk_rope_head_dim / 2] for integer positions [B, L]."""
        cfg = self.cfg
        return rope_angles(positions, inverse_frequencies(cfg.qk_rope_head_dim, cfg.rope_parameters), self.dtype)

    def head(self, h):
        """float32 logits [B, L, ..., V] of hidden states [B, L, ..., D] (any axes between L and D)."""
        with jax.named_scope(scopes.HEAD):
            logits = jnp.einsum("...d,dv->...v", h, self.lm_head[...].astype(self.dtype),
                                preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length") + (None,) * (logits.ndim - 3) + ("act_vocab",))

    def __call__(self, input_ids, positions=None, segment_ids=None, *, mtp_depths: int | None = None,
                 dsa_mode: str = "sparse", logits: bool = True):
        """Logits for `input_ids` [B, L] (with `logits=False`, the hidden states the head would read).

        positions: [B, L] RoPE positions (default 0..L-1); segment_ids: [B, L] document ids of packed rows
        (attention and the indexer never cross a change of id; default one document per row).
        mtp_depths: MTP depths to run (default cfg.mtp_depths; 0 skips MTP).
        dsa_mode: "sparse" (inference and normal training), "dense" (dense attention at every length, no
        indexer: pre- and mid-training before DSA), "warmup" (dense attention at every length; the
        indexer's KL against it in `stats.indexer_kl`) or "sparse_adapt" (top-k attention; KL over the
        selected keys). See docs/losses.md.
        """
        cfg = self.cfg
        B, L = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if segment_ids is None:
            segment_ids = jnp.ones((B, L), jnp.int32)
        cos, sin = self.rope(positions)
        depths = cfg.mtp_depths if mtp_depths is None else mtp_depths
        depths = depths if self.mtp is not None else 0
        # One lookup for the main model and every MTP depth (the table is gathered, and its gradient summed,
        # once): depth k reads token t + k at position t; past the end it reads padding (id 0), never scored.
        padded = jnp.pad(input_ids, ((0, 0), (0, depths)))
        ids = jnp.stack([padded[:, k:k + L] for k in range(depths + 1)])
        embeds = constrain(self.embed(ids), (None,) + HIDDEN)
        h, mtp_embeds, stats = embeds[0], embeds[1:], []
        # Sparse attention carries the last full layer's top-k to the "shared" layers after it.
        sparse = cfg.index_topk < L and dsa_mode in ("sparse", "sparse_adapt")
        topk_idx = jnp.zeros((B, L, cfg.index_topk), jnp.int32) if sparse else None
        # Under a pipeline layout one group runs as a pipeline (sharding/pipeline.py; docs/parallelism.md).
        piped = pipelined_group(layer_groups(cfg)) if runners().pipelined else None
        for i, stack in enumerate(self.layers):
            graphdef, state = nnx.split(stack)
            group = functools.partial(scan_layers, graphdef, remat_policy=cfg.remat_policy, dsa_mode=dsa_mode)
            run = pipeline.run_pipelined if i == piped else _whole
            h, topk_idx, group_stats = run(group, state, h, cos, sin, segment_ids, topk_idx)
            stats.append(group_stats)
        stats = LayerStats(*(_concat([getattr(s, f) for s in stats]) for f in LayerStats._fields))
        h = self.norm(h)
        head = self.head if logits else (lambda normed: normed)
        mtp_logits = mtp_stats = None
        if depths:
            graphdef, mtp_state = nnx.split(self.mtp)

            def depth(h, embeds_k):  # one shared parameter set, scanned over depths: compiled once
                h, normed, layer_stats = nnx.merge(graphdef, mtp_state).step(h, embeds_k, cos, sin, segment_ids,
                                                                             dsa_mode)
                return h, (head(normed), layer_stats)

            if cfg.remat_policy != "none":  # like the main layers: the backward recomputes a depth's insides
                depth = jax.checkpoint(depth, policy=REMAT[cfg.remat_policy], prevent_cse=False)
            _, (mtp_logits, mtp_stats) = jax.lax.scan(depth, h, mtp_embeds)
        if logits:
            return ModelOutput(self.head(h), mtp_logits, stats.load, stats, mtp_stats)
        return ModelOutput(None, None, stats.load, stats, mtp_stats, h, mtp_logits)


def _whole(group, state, *args):
    """A layer group run as it is (no pipeline): `group` over all of its stacked `state`."""
    return group(state, *args)


def _concat(parts):
    parts = [p for p in parts if p is not None]
    return jnp.concatenate(parts) if parts else None
