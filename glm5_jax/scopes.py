"""The names of the program's parts, each a `jax.named_scope` opened around that part wherever it runs.

JAX writes the scopes a traced operation runs in into the compiled HLO's metadata (`op_name`, the name stack:
`jit(step)/glm5.accumulate/.../transpose(jvp(glm5.attention))/dot_general`), in the backward pass and inside
loops and rematerialised code too. `glm5_jax.accounting` attributes compiled FLOPs to parts, and runtime trip
counts to loops, by these names and no others, so renaming or moving a Python function changes no figure.
Declared once, here; this module imports nothing, so the model, sharding, optimizer and train code can open
them.
"""

from __future__ import annotations

# Model parts (glm5_jax/model/): where their matrix products are traced.
ATTENTION = "glm5.attention"  # MLA of a decoder layer: projections, attention core (MLA.forward)
INDEXER = "glm5.indexer"  # DSA's lightning indexer: its projections and block top-k selection
ROUTER = "glm5.router"  # the MoE's router logits and routing
ROUTED_EXPERTS = "glm5.routed_experts"  # the grouped matmul of the routed experts (ragged_dot or tiled loop)
FFN = "glm5.ffn"  # a SwiGLU: a dense layer's FFN, the MoE's shared expert
HEAD = "glm5.head"  # the output head (main and MTP depths)
MTP_PROJECTION = "glm5.mtp_projection"  # MTP's input projection (eh_proj of [embeds | hidden])
# Outside the model.
NEWTON_SCHULZ = "glm5.newton_schulz"  # Muon's Newton-Schulz iterations (glm5_jax/optim/muon.py)
PIPELINE = "glm5.pipeline"  # the pipeline's stage iterations (sharding/pipeline.py), a loop
# Loops whose trip count depends on runtime values (the compiled HLO has none for them).
ACCUMULATE = "glm5.accumulate"  # the train step's loop over its microbatches (glm5_jax/train/step.py)
TOPK_MERGE = "glm5.topk_merge"  # the indexer's merge of key chunks into a query block's running top-k
FLASH_KEYS = "glm5.flash_keys"  # dense attention's loop over the key blocks one query block sees (model/flash.py)
