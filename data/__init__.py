"""Input pipelines: sources, tokenizers, packing and context-extension stages."""
