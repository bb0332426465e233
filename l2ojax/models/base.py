"""What every learned optimizer provides: ``init(key) -> theta`` and
``transform(theta) -> optax.GradientTransformationExtraArgs``."""
from __future__ import annotations

from typing import Any, Dict, Protocol

import chex
import jax
import optax


class LearnedOptimizer(Protocol):
  name: str

  def init(self, key: chex.PRNGKey) -> chex.ArrayTree:
    """Fresh meta-parameters ``theta``."""

  def transform(self, theta: chex.ArrayTree) -> optax.GradientTransformationExtraArgs:
    """The optimizer that ``theta`` describes, usable in any optax loop."""

  def options(self) -> Dict[str, Any]:
    """Constructor options, enough to rebuild this model by name."""


def check_theta(lopt: Any, theta: chex.ArrayTree) -> None:
  """Raises a ValueError naming the mismatch when ``theta`` is not this model's."""
  expected = jax.eval_shape(lopt.init, jax.random.PRNGKey(0))
  want = jax.tree_util.tree_structure(expected)
  got = jax.tree_util.tree_structure(theta)
  if want != got:
    raise ValueError(f"{lopt.name}.transform: theta has structure {got}, "
                     f"expected this model's {want}")
  for path, e, t in zip(jax.tree_util.tree_leaves_with_path(expected),
                        jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(theta)):
    if getattr(t, "shape", None) != e.shape:
      raise ValueError(f"{lopt.name}.transform: theta{jax.tree_util.keystr(path[0])} has shape "
                       f"{getattr(t, 'shape', None)}, expected {e.shape}")
