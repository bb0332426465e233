"""Checkpoints of a meta-training run (orbax) and stand-alone trained-optimizer files."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import serialization


class CheckpointManager:
  """Saves (pytree state, JSON metadata) pairs; a half-written save is never the latest.

  orbax writes each step to a temporary folder and renames it when complete,
  so a run killed mid-save restores from the previous step.
  """

  def __init__(self, directory: str, max_to_keep: int = 2):
    self._mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def save(self, step: int, state: chex.ArrayTree, metadata: Dict[str, Any]) -> None:
    """Saves ``state``, whose arrays hold the same values in every process (a
    meta-training's theta, optimizer states and key), as host arrays: under
    ``jax.distributed`` a process-local array cannot be saved as a jax.Array."""
    state = host_arrays(state)
    self._mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  metadata=ocp.args.JsonSave(metadata)))
    self._mngr.wait_until_finished()

  def restore(self, target: chex.ArrayTree, step: Optional[int] = None
              ) -> Tuple[chex.ArrayTree, Dict[str, Any]]:
    """Restores into the structure, shapes and dtypes of ``target``, as host arrays."""
    step = self._mngr.latest_step() if step is None else step
    abstract = jax.tree_util.tree_map(lambda x: np.zeros(np.shape(x), x.dtype), target)
    out = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()))
    return out.state, out.metadata

  def close(self) -> None:
    self._mngr.close()


def host_arrays(tree: chex.ArrayTree) -> chex.ArrayTree:
  """This process's copies (numpy) of arrays that every process holds whole, e.g. a
  meta-training's state replicated over the devices of several hosts."""
  def copy(x):
    if isinstance(x, jax.Array):
      if not x.is_fully_replicated:
        raise ValueError(f"checkpoints: an array of shape {x.shape} is split over devices "
                         f"({x.sharding}); only replicated arrays can be copied whole")
      return np.asarray(x.addressable_data(0))
    return np.asarray(x)
  return jax.tree_util.tree_map(copy, tree)


def save_theta(path: str, lopt: Any, theta: chex.ArrayTree, info: Optional[dict] = None) -> None:
  """Writes a trained optimizer (model name, options, theta) as one msgpack file."""
  payload = {"model": lopt.name, "options": lopt.options(), "info": info or {},
             "theta": jax.tree_util.tree_map(np.asarray, jax.device_get(theta))}
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(payload))
  os.replace(tmp, path)  # never a half-written file under the final name


def load_theta(path: str) -> Tuple[Any, chex.ArrayTree, dict]:
  """Reads a file written by ``save_theta``: returns (learned optimizer, theta, info)."""
  from l2ojax import models  # models import nothing from here; avoid a cycle at import

  with open(path, "rb") as f:
    payload = serialization.msgpack_restore(f.read())
  lopt = models.get(payload["model"], **_lists_to_tuples(payload["options"]))
  theta = jax.tree_util.tree_map(jax.numpy.asarray, payload["theta"])
  models.check_theta(lopt, theta)
  return lopt, theta, payload.get("info", {})


def _lists_to_tuples(d: dict) -> dict:
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
