"""Evaluation: loss curves of optimizers on the same fresh optimizees, tuned baselines."""
from __future__ import annotations

import functools
from typing import Callable, Dict, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2ojax.meta.unroll import batch_rollout

ADAM_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _curves(tx: optax.GradientTransformation, optimizee, keys, num_steps):
  return batch_rollout(tx, optimizee, keys, num_steps)


def curves(tx: optax.GradientTransformation, optimizee, keys: chex.Array,
           num_steps: int) -> np.ndarray:
  """Losses [len(keys), num_steps + 1] of ``tx``; key i draws the same init and
  minibatches for every ``tx``."""
  return np.asarray(_curves(tx, optimizee, keys, num_steps))


def _lr_curves(make_tx: Callable[[float], optax.GradientTransformation], optimizee,
               keys, num_steps: int, learning_rates: Sequence[float]) -> chex.Array:
  # One compile for the whole grid: the learning rate is a traced argument.
  def run(lr):
    return batch_rollout(make_tx(lr), optimizee, keys, num_steps)
  return jax.jit(jax.vmap(run))(jnp.asarray(learning_rates, jnp.float32))


class Tuned(NamedTuple):
  learning_rate: float
  scores: Dict[float, float]  # learning rate -> mean final loss (nan/inf when diverged)


def tune_learning_rate(make_tx: Callable[[float], optax.GradientTransformation], optimizee,
                       keys: chex.Array, num_steps: int,
                       learning_rates: Sequence[float] = ADAM_LEARNING_RATES) -> Tuned:
  """Grid search: the rate whose mean loss at the last step is lowest.

  Runs that end non-finite score +inf, so a diverging rate is never chosen.
  """
  if not learning_rates:
    raise ValueError("learning_rates must be non-empty")
  losses = np.asarray(_lr_curves(make_tx, optimizee, keys, num_steps, learning_rates))
  final = losses[:, :, -1]
  scores = np.where(np.isfinite(final).all(axis=1), final.mean(axis=1), np.inf)
  best = int(np.argmin(scores))
  return Tuned(float(learning_rates[best]),
               {float(lr): float(s) for lr, s in zip(learning_rates, scores)})
