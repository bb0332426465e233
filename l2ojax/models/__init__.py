"""Learned optimizers: ``lopt = models.get(name, **options)``; ``lopt.init(key)``;
``lopt.transform(theta)`` is an optax.GradientTransformationExtraArgs."""
from __future__ import annotations

from typing import Any, Callable, Dict

from l2ojax.models.base import (LearnedOptimizer, check_params, check_theta,
                                 check_update_inputs)
from l2ojax.models.dm import DM, DMState, dm
from l2ojax.models.rnnprop import RNNProp, RNNPropState, rnnprop
from l2ojax.models.scale import Scale, ScaleState, scale

_REGISTRY: Dict[str, Callable[..., Any]] = {}


def register(name: str, factory: Callable[..., Any]) -> None:
  _REGISTRY[name] = factory


def names() -> list:
  return sorted(_REGISTRY)


def get(name: str, **options: Any) -> LearnedOptimizer:
  if name not in _REGISTRY:
    raise ValueError(f"model.name={name!r} is unknown; allowed: {names()}")
  return _REGISTRY[name](**options)


register("dm", dm)
register("rnnprop", rnnprop)
register("scale", scale)

__all__ = ["get", "names", "register", "LearnedOptimizer", "check_theta", "check_params",
           "check_update_inputs", "DM", "DMState", "dm", "RNNProp", "RNNPropState", "rnnprop",
           "Scale", "ScaleState", "scale"]
