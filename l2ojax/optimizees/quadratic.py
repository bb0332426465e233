"""The paper's quadratic family: f(x) = mean_i ||W_i x - y_i||^2."""
from __future__ import annotations

from typing import Tuple

import chex
import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Quadratic:
  """x in R^dim; each optimizee has ``num_instances`` (W, y) pairs, W, y ~ U[0, 1).

  Matches deepmind/learning-to-learn's ``problems.quadratic``: the loss is the
  mean over instances of the squared residual norm, x starts at N(0, init_scale^2).
  """

  dim: int = struct.field(pytree_node=False, default=10)
  num_instances: int = struct.field(pytree_node=False, default=128)
  init_scale: float = struct.field(pytree_node=False, default=0.01)
  name: str = struct.field(pytree_node=False, default="quadratic")

  def init(self, key: chex.PRNGKey) -> Tuple[dict, dict]:
    k_w, k_y, k_x = jax.random.split(key, 3)
    w = jax.random.uniform(k_w, (self.num_instances, self.dim, self.dim))
    y = jax.random.uniform(k_y, (self.num_instances, self.dim))
    x = self.init_scale * jax.random.normal(k_x, (self.dim,))
    return {"x": x}, {"w": w, "y": y}

  def loss(self, params: dict, instance: dict, key: chex.PRNGKey) -> chex.Array:
    del key  # deterministic: no minibatch
    residual = jnp.einsum("bij,j->bi", instance["w"], params["x"]) - instance["y"]
    return jnp.mean(jnp.sum(residual**2, axis=-1))


def quadratic(dim: int = 10, num_instances: int = 128, init_scale: float = 0.01) -> Quadratic:
  if dim < 1 or num_instances < 1:
    raise ValueError(f"quadratic: dim and num_instances must be >= 1, got dim={dim}, "
                     f"num_instances={num_instances}")
  return Quadratic(dim=dim, num_instances=num_instances, init_scale=init_scale)
