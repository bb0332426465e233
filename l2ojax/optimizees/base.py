"""The optimizee interface: a problem family as plain data plus pure functions.

An optimizee is a pytree (a ``flax.struct`` dataclass) whose array leaves are
the data every member of the family shares (a data set on the device) and
whose static fields are its hyperparameters. Whatever varies between two
members of the family is returned by ``init`` as the ``instance`` pytree, so a
batch of optimizees is ``jax.vmap(optimizee.init)(keys)`` and
``jax.vmap(optimizee.loss, in_axes=(0, 0, 0))``: nothing that varies is ever
closed over.
"""
from __future__ import annotations

from typing import Any, Protocol, Tuple

import chex

Params = chex.ArrayTree
Instance = chex.ArrayTree


class Optimizee(Protocol):
  """A family of optimization problems."""

  name: str

  def init(self, key: chex.PRNGKey) -> Tuple[Params, Instance]:
    """Draws one member of the family: its initial params and its instance."""

  def loss(self, params: Params, instance: Instance, key: chex.PRNGKey) -> chex.Array:
    """Scalar training loss; ``key`` draws the minibatch (if any)."""


def describe(optimizee: Any) -> str:
  return f"{optimizee.name}({getattr(optimizee, 'options', lambda: {})()})"
