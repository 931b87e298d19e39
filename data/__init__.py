"""Input pipelines: sources, tokenizers, packing and context-extension stages.

Entry points: :class:`glm5_jax.data.loader.DataPipeline` (batches per step, resumable through Orbax),
:func:`glm5_jax.data.config.load` (YAML presets in ``configs/data/``); see docs/data.md.
"""
