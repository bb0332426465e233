"""The meta-batch of optimizees sharded over devices.

The meta-step needs no change to run on many devices: its inputs say where
they live and XLA (GSPMD) partitions the program accordingly. Given the mesh
(``make_meta_step(..., mesh=)``), each device instead runs the per-optimizee
part on its own rows in a program of its own (``per_device``, ``shard_map``):
what the fused Pallas kernels need, which XLA's partitioner cannot split
(it would gather the whole batch onto every device around them). The batch of
unroll states is split along its leading (optimizee) axis over a 1-D mesh;
theta, the outer optimizer's state and the optimizee's data set are
replicated. Each device then unrolls its own optimizees, and the only
communication per meta-step is the all-reduce of the meta-gradient (the mean
over the batch). The same code runs on one device (a mesh of one) or many.

Several hosts: call ``jax.distributed.initialize()`` (with the coordinator's
address, the number of processes and this process's id, or nothing on
managed clusters that set them) at start-up in every process, before anything
else touches JAX. ``jax.devices()`` then lists every host's devices, so
``make_mesh()`` spans them all; every process runs the same program,
``sharded_init_states`` gives each process the rows of its own devices, and
``replicate`` expects the same values in every process (same seed).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import chex
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh named ``"batch"`` over ``devices`` (default: all, on every host)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    raise ValueError("make_mesh: no devices given")
  return Mesh(np.asarray(devices), (BATCH_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the mesh, the rest whole on each device."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _check_divisible(tree: chex.ArrayTree, mesh: Mesh) -> None:
  n = mesh.devices.size
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = np.shape(leaf)
    if not shape or shape[0] % n:
      raise ValueError(f"shard_states: leaf {jax.tree_util.keystr(path)} has shape {shape}; "
                       f"its leading (batch) axis must be a multiple of the {n} devices")


def shard_states(states: chex.ArrayTree, mesh: Mesh) -> chex.ArrayTree:
  """Places a batch of unroll states (leading axis = optimizee) over ``mesh``."""
  _check_divisible(states, mesh)
  return jax.device_put(states, batch_sharding(mesh))


def replicate(tree: chex.ArrayTree, mesh: Mesh) -> chex.ArrayTree:
  """Places ``tree`` (theta, outer state, an optimizee's data) whole on every device."""
  return jax.device_put(tree, replicated(mesh))


def sharded_init_states(init_states: Callable, mesh: Mesh) -> Callable:
  """``make_init_states``' function, its batch of fresh states born sharded.

  Creating the states in place (rather than on one device, then moving them)
  is what works across hosts, where no process can hold the whole batch.
  """
  fn = getattr(init_states, "__wrapped__", init_states)
  return jax.jit(fn, out_shardings=batch_sharding(mesh))


def per_device(fn: Callable, mesh: Optional[Mesh], batched: Tuple[bool, ...]) -> Callable:
  """``fn``, a function of a batch of optimizees (``vmap``), run by each device of
  ``mesh`` on its own rows of the batch (``jax.shard_map``); ``fn`` itself without a
  mesh. ``batched[i]``: argument i has the optimizee batch as leading axis (split
  over the mesh), else it is replicated; every output has the batch as leading axis.
  """
  if mesh is None:
    return fn
  spec = lambda b: PartitionSpec(BATCH_AXIS) if b else PartitionSpec()
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(map(spec, batched)),
                       out_specs=PartitionSpec(BATCH_AXIS), check_vma=False)
