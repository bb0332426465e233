"""L2O-DM on the paper's quadratic family: the built-in default, no download needed.

Sized to finish in a few minutes on a 2-core CPU. Every field and its default
is in ``l2ojax.meta.config.default_config``.
"""
import ml_collections

from l2ojax.meta.config import ADAM_LEARNING_RATES, default_config

__all__ = ["ADAM_LEARNING_RATES", "get_config"]


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.name = "dm_quadratic"
  # learning-to-learn's quadratic setting: raw gradients in, output scale 1.
  c.model = ml_collections.ConfigDict(
      {"name": "dm", "options": {"preprocessing": "identity", "scale": 1.0}})
  c.optimizee = ml_collections.ConfigDict({"name": "quadratic", "options": {}})
  c.meta.batch_size = 32
  c.meta.num_episodes = 300
  c.validation.period = 10
  c.validation.num_optimizees = 64
  c.checkpoint_every = 25
  return c
