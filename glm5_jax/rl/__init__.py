"""Reinforcement learning on the model's own rollouts (docs/post-training.md)."""
