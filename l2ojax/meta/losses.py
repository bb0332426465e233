"""Meta-losses: how a segment's optimizee losses f(x_0..x_T) become one scalar."""
from __future__ import annotations

from typing import Callable, Dict

import chex
import jax.numpy as jnp


def sum_loss(losses: chex.Array, initial_loss: chex.Array) -> chex.Array:
  """The paper's (and learning-to-learn's): unweighted sum over t = 0..T."""
  del initial_loss
  return jnp.sum(losses)


def mean_loss(losses: chex.Array, initial_loss: chex.Array) -> chex.Array:
  del initial_loss
  return jnp.mean(losses)


def last_loss(losses: chex.Array, initial_loss: chex.Array) -> chex.Array:
  del initial_loss
  return losses[-1]


def log_ratio_loss(losses: chex.Array, initial_loss: chex.Array) -> chex.Array:
  """L2O-Scale's: mean over the unroll of log(f_t / (f_0 + 1e-6) + 1e-6).

  f_0 is the episode's first loss.
  """
  return jnp.mean(jnp.log(losses / (initial_loss + 1e-6) + 1e-6))


META_LOSSES: Dict[str, Callable[[chex.Array, chex.Array], chex.Array]] = {
    "sum": sum_loss, "mean": mean_loss, "last": last_loss, "log_ratio": log_ratio_loss,
}


def get(name: str) -> Callable[[chex.Array, chex.Array], chex.Array]:
  if name not in META_LOSSES:
    raise ValueError(f"meta.loss={name!r}; allowed: {sorted(META_LOSSES)}")
  return META_LOSSES[name]
