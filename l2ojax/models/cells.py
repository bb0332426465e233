"""Recurrent cells shared by the learned optimizers, applied coordinatewise.

Every row of the input is one optimizee coordinate, so a cell is a plain
batched matmul over [num_coordinates, features].
"""
from __future__ import annotations

from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp


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


def lstm_apply(params: dict, x: chex.Array, state: LSTMState,
               forget_bias: float = 1.0) -> LSTMState:
  """Sonnet v1 LSTM: gates = [x, h] @ W + b in order (i, j, f, o).

  The four gates come from one fused matmul; splitting x @ W_x + h @ W_h avoids
  materialising the concatenation.
  """
  n_in = x.shape[-1]
  w = params["w"]
  gates = x @ w[:n_in] + state.h @ w[n_in:] + params["b"]
  i, j, f, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f + forget_bias) * state.c + jax.nn.sigmoid(i) * jnp.tanh(j)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return LSTMState(h, c)


def linear_init(key: chex.PRNGKey, input_size: int, output_size: int) -> dict:
  return {"w": truncated_normal(key, (input_size, output_size), input_size),
          "b": jnp.zeros((output_size,))}


def linear_apply(params: dict, x: chex.Array) -> chex.Array:
  return x @ params["w"] + params["b"]
