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


def check_params(name: str, params: chex.ArrayTree, what: str = "params") -> None:
  """Learned optimizers act on floating-point arrays; anything else is a clear error."""
  leaves = jax.tree_util.tree_leaves_with_path(params)
  if not leaves:
    raise ValueError(f"{name}: {what} is an empty pytree")
  for path, leaf in leaves:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jax.numpy.issubdtype(dtype, jax.numpy.floating):
      raise TypeError(f"{name}: {what}{jax.tree_util.keystr(path)} has dtype {dtype}; "
                      f"learned optimizers need floating-point arrays")


def check_update_inputs(name: str, updates: chex.ArrayTree,
                        params: chex.ArrayTree | None) -> None:
  """Gradients must be float and match the params' structure and shapes."""
  check_params(name, updates, "gradients")
  if params is None:
    return
  s_u, s_p = jax.tree_util.tree_structure(updates), jax.tree_util.tree_structure(params)
  if s_u != s_p:
    raise ValueError(f"{name}.update: gradients have structure {s_u} but params have {s_p}")
  for (path, u), p in zip(jax.tree_util.tree_leaves_with_path(updates),
                          jax.tree_util.tree_leaves(params)):
    if u.shape != p.shape:
      raise ValueError(f"{name}.update: gradient{jax.tree_util.keystr(path)} has shape "
                       f"{u.shape} but the param has {p.shape}")
