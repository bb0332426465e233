"""A batch of independent 2-d Rosenbrock problems per optimizee.

Each optimizee holds ``num_instances`` problems
f_i(x, y) = (a_i - x)^2 + b_i (y - x^2)^2, minimum 0 at (a_i, a_i^2), with its
own point (x_i, y_i) in ``params["xy"]`` ([num_instances, 2]) and its own a_i,
b_i in the instance pytree. The loss is the mean of the f_i: as the problems
share no coordinate, a coordinatewise learned optimizer faces num_instances
separate valleys at once (the usual way the field batches this test function),
and the curve is their mean. Starting points are U[-2, 2]^2, the classic
plotting window, rather than N(0, 0.01): near the origin the valley is trivial.
"""
from __future__ import annotations

from typing import Tuple

import chex
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Rosenbrock:
  num_instances: int = struct.field(pytree_node=False, default=128)
  a_range: Tuple[float, float] = struct.field(pytree_node=False, default=(0.5, 1.5))
  b_range: Tuple[float, float] = struct.field(pytree_node=False, default=(10.0, 100.0))
  init_range: float = struct.field(pytree_node=False, default=2.0)
  name: str = struct.field(pytree_node=False, default="rosenbrock")

  def init(self, key: chex.PRNGKey) -> Tuple[dict, dict]:
    k_a, k_b, k_x = jax.random.split(key, 3)
    n = self.num_instances
    a = jax.random.uniform(k_a, (n,), minval=self.a_range[0], maxval=self.a_range[1])
    b = jax.random.uniform(k_b, (n,), minval=self.b_range[0], maxval=self.b_range[1])
    xy = jax.random.uniform(k_x, (n, 2), minval=-self.init_range, maxval=self.init_range)
    return {"xy": xy}, {"a": a, "b": b}

  def loss(self, params: dict, instance: dict, key: chex.PRNGKey) -> chex.Array:
    del key  # deterministic: no minibatch
    x, y = params["xy"][:, 0], params["xy"][:, 1]
    return jnp.mean((instance["a"] - x) ** 2 + instance["b"] * (y - x**2) ** 2)


def rosenbrock(num_instances: int = 128, a_range: Tuple[float, float] = (0.5, 1.5),
               b_range: Tuple[float, float] = (10.0, 100.0),
               init_range: float = 2.0) -> Rosenbrock:
  a_range, b_range = tuple(float(v) for v in a_range), tuple(float(v) for v in b_range)
  if num_instances < 1:
    raise ValueError(f"rosenbrock: num_instances must be >= 1, got {num_instances}")
  if len(a_range) != 2 or len(b_range) != 2 or a_range[0] > a_range[1] or not (
      0 < b_range[0] <= b_range[1]):
    raise ValueError(f"rosenbrock: a_range {a_range} and b_range {b_range} must be (low, high) "
                     f"with low <= high and b > 0")
  if init_range <= 0:
    raise ValueError(f"rosenbrock: init_range must be > 0, got {init_range}")
  return Rosenbrock(num_instances=num_instances, a_range=a_range, b_range=b_range,
                    init_range=float(init_range))
