"""Generation: a latent decode cache, prefill and decode steps, sampling, MTP speculative decoding."""

from glm5_jax.generate.cache import DecodeCache, LayerCache, cache_bytes_per_token
from glm5_jax.generate.runner import GenerationResult, Generator, check_max_length
from glm5_jax.generate.sampling import Sampling

__all__ = ["DecodeCache", "GenerationResult", "Generator", "LayerCache", "Sampling", "cache_bytes_per_token",
           "check_max_length"]
