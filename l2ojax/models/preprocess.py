"""Gradient preprocessing for coordinatewise learned optimizers."""
from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np


def log_and_sign(g: chex.Array, k: float = 5.0) -> chex.Array:
  """Andrychowicz et al.'s preprocessing: [max(log(|g| + eps) / k, -1), clip(g e^k, -1, 1)].

  Maps a gradient's scale and sign into [-1, 1] each, so one network serves
  coordinates whose gradients differ by orders of magnitude. Returns [..., 2].
  """
  eps = np.finfo(np.float32).eps
  log = jnp.maximum(jnp.log(jnp.abs(g) + eps) / k, -1.0)
  sign = jnp.clip(g * np.exp(k), -1.0, 1.0)
  return jnp.stack([log, sign], axis=-1)


def identity(g: chex.Array) -> chex.Array:
  return g[..., None]


PREPROCESSORS = {"log_and_sign": log_and_sign, "identity": identity}
