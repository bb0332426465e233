"""Learned optimizers meta-trained with l2ojax and shipped with the package.

  import l2ojax
  tx = l2ojax.pretrained.load("dm_cl_il_mnist")   # an optax.GradientTransformation
  print(l2ojax.pretrained.card("dm_cl_il_mnist"))  # what it was trained on, and how it does

Each optimizer is a ``NAME.msgpack`` file (model, options, theta, training
info) beside its model card ``NAME.md``.
"""
from __future__ import annotations

import os
from typing import Any, List, Tuple

import chex
import optax

from l2ojax import checkpoints

DIRECTORY = os.path.dirname(os.path.abspath(__file__))


def names() -> List[str]:
  """The shipped pretrained optimizers."""
  return sorted(f[:-len(".msgpack")] for f in os.listdir(DIRECTORY) if f.endswith(".msgpack"))


def path(name: str) -> str:
  """The weights file of ``name``."""
  known = names()
  if name not in known:
    raise ValueError(f"no pretrained optimizer {name!r}; available: {known}")
  return os.path.join(DIRECTORY, name + ".msgpack")


def load_theta(name: str) -> Tuple[Any, chex.ArrayTree, dict]:
  """(learned optimizer, theta, training info) of ``name``."""
  return checkpoints.load_theta(path(name))


def load(name: str) -> optax.GradientTransformationExtraArgs:
  """The pretrained optimizer ``name`` as an optax transformation.

  Use it like ``optax.adam``: ``updates, state = tx.update(grads, state,
  params)``; L2O-Scale also wants ``value=loss``.
  """
  lopt, theta, _ = load_theta(name)
  return lopt.transform(theta)


def card(name: str) -> str:
  """The model card of ``name`` (markdown)."""
  with open(path(name)[:-len(".msgpack")] + ".md") as f:
    return f.read()
