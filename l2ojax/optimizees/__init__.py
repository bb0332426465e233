"""Pure-function optimizees, looked up by name: ``get(name, **options)``."""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict

from l2ojax.optimizees import data
from l2ojax.optimizees.base import Optimizee
from l2ojax.optimizees.conv import ConvNet, conv_net
from l2ojax.optimizees.data import DataUnavailableError
from l2ojax.optimizees.mlp import MLP, mlp
from l2ojax.optimizees.quadratic import Quadratic, quadratic
from l2ojax.optimizees.rosenbrock import Rosenbrock, rosenbrock

_REGISTRY: Dict[str, Callable[..., Any]] = {}
_USES_DATA: Dict[str, bool] = {}


def register(name: str, factory: Callable[..., Any], uses_data: bool = False) -> None:
  """Makes ``get(name, **options)`` call ``factory(**options)``.

  ``uses_data``: the factory takes the data fields (source, path, split, data_dir).
  """
  _REGISTRY[name] = factory
  _USES_DATA[name] = uses_data


def uses_data(name: str) -> bool:
  if name not in _REGISTRY:
    raise ValueError(f"optimizee.name={name!r} is unknown; allowed: {names()}")
  return _USES_DATA[name]


def names() -> list:
  return sorted(_REGISTRY)


register("quadratic", quadratic)
register("rosenbrock", rosenbrock)
# The paper's evaluation zoo; every default below can be overridden by an option.
register("mnist_mlp", functools.partial(mlp, dataset="mnist", name="mnist_mlp"), uses_data=True)
register("mnist_relu", functools.partial(mlp, dataset="mnist", activation="relu",
                                         name="mnist_relu"), uses_data=True)
register("mnist_deeper", functools.partial(mlp, dataset="mnist", hidden_sizes=(20, 20),
                                           name="mnist_deeper"), uses_data=True)
register("fashion_mlp", functools.partial(mlp, dataset="fashion_mnist", name="fashion_mlp"),
         uses_data=True)
register("mnist_conv", functools.partial(conv_net, dataset="mnist", stride=1, name="mnist_conv"),
         uses_data=True)
register("cifar_conv", functools.partial(conv_net, dataset="cifar10", stride=2, name="cifar_conv"),
         uses_data=True)


def get(name: str, **options: Any) -> Optimizee:
  """Builds the optimizee family ``name``; unknown names list the known ones."""
  if name not in _REGISTRY:
    raise ValueError(f"optimizee.name={name!r} is unknown; allowed: {names()}")
  return _REGISTRY[name](**options)


__all__ = ["get", "names", "register", "uses_data", "Optimizee", "MLP", "Quadratic", "mlp",
           "quadratic", "ConvNet", "conv_net", "Rosenbrock", "rosenbrock", "data",
           "DataUnavailableError"]
