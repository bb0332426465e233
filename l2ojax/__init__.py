"""l2ojax: learning to optimize in JAX, every optimizer an optax transformation."""
from l2ojax import checkpoints, evaluation, meta, models, optimizees, pretrained

__version__ = "0.1.0"
__all__ = ["checkpoints", "evaluation", "meta", "models", "optimizees", "pretrained"]
