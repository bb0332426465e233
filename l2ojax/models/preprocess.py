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
  return jnp.stack(log_and_sign_parts(g, k), axis=-1)


def log_and_sign_parts(g: chex.Array, k: float = 5.0):
  """(log part, sign part) of ``log_and_sign``, each shaped like ``g`` (also what the
  fused LSTM kernel computes in its lanes)."""
  eps = float(np.finfo(np.float32).eps)
  return (jnp.maximum(jnp.log(jnp.abs(g) + eps) / k, -1.0),
          jnp.clip(g * float(np.exp(k)), -1.0, 1.0))


def identity(g: chex.Array) -> chex.Array:
  return g[..., None]


PREPROCESSORS = {"log_and_sign": log_and_sign, "identity": identity}
