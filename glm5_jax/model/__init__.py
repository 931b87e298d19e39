"""GLM-5 as Flax NNX modules: norms, RoPE, MLA, the DSA indexer, MoE, MTP and the stacked transformer."""

from glm5_jax.model.transformer import GLM5, LayerGroup, ModelOutput, layer_groups, layer_range_name

__all__ = ["GLM5", "LayerGroup", "ModelOutput", "layer_groups", "layer_range_name"]
