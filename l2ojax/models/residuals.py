"""A function's backward-pass residuals packed into one array per dtype.

In a loop of steps, backprop stacks every array a step keeps for the backward
pass in a kernel of its own (a dynamic-update-slice per array and step on a
GPU). A learned optimizer whose step keeps dozens of small arrays (L2O-Scale:
momenta, features, gates of three recurrent levels) spends as many kernels
per step on that alone; ``packed`` keeps the same values as one flat array
per dtype, stacked in one kernel.
"""
from __future__ import annotations

from typing import Callable, Dict, List

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def packed(fn: Callable) -> Callable:
  """``fn`` with the same values and gradients, whose residuals (what
  ``jax.vjp(fn, ...)`` keeps) are one flat array per dtype. ``fn``'s arguments
  and results are pytrees of arrays; it must not close over values being
  differentiated (pass them as arguments)."""

  def apply(*args):
    # a custom_vjp per call, so that each forward pass's static layout is the
    # one its backward pass reads
    layout: Dict[str, object] = {}

    @jax.custom_vjp
    def call(*args):
      return fn(*args)

    def call_fwd(*args):
      out, vjp_fn = jax.vjp(fn, *args)
      leaves, treedef = jax.tree_util.tree_flatten(vjp_fn)
      groups: Dict[str, List[int]] = {}
      for i, leaf in enumerate(leaves):
        groups.setdefault(jnp.result_type(leaf).name, []).append(i)
      layout.update(treedef=treedef, groups=groups,
                    shapes=[np.shape(leaf) for leaf in leaves])
      flat = {dtype: jnp.concatenate([jnp.ravel(leaves[i]) for i in idx])
              for dtype, idx in groups.items()}
      return out, flat

    def call_bwd(flat, cotangent):
      shapes, leaves = layout["shapes"], {}
      for dtype, idx in layout["groups"].items():
        sizes = [int(np.prod(shapes[i])) for i in idx]
        for i, part in zip(idx, jnp.split(flat[dtype], np.cumsum(sizes)[:-1])):
          leaves[i] = part.reshape(shapes[i])
      vjp_fn = jax.tree_util.tree_unflatten(layout["treedef"],
                                            [leaves[i] for i in range(len(leaves))])
      return vjp_fn(cotangent)

    call.defvjp(call_fwd, call_bwd)
    return call(*args)

  return apply


@jax.custom_vjp
def flat_gradient(flat: jax.Array, tree):
  """``tree``, whose gradient goes to ``flat`` (``ravel_pytree(tree)[0]``, the same
  values) as one vector; ``tree`` itself gets none.

  A loop of steps that reads the leaves of a loop-invariant pytree (a learned
  optimizer's theta) sums their gradients over the steps in an accumulator per
  leaf: a kernel per leaf and step on a GPU. Read through this, the loop sums
  one vector. The forward pass reads the leaves themselves (no slicing of
  ``flat`` per step).
  """
  del flat
  return tree


def _flat_gradient_fwd(flat, tree):
  del flat
  return tree, None


def _flat_gradient_bwd(_, cotangent):
  return (ravel_pytree(cotangent)[0], jax.tree_util.tree_map(jnp.zeros_like, cotangent))


flat_gradient.defvjp(_flat_gradient_fwd, _flat_gradient_bwd)
