"""The jitted meta-step: a vmapped batch of truncated unrolls, one outer update."""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2ojax.meta import losses as losses_lib
from l2ojax.meta import remat as remat_lib
from l2ojax.meta import sharding as sharding_lib
from l2ojax.meta.unroll import UnrollState, batch_rollout, init_state, unroll


def tree_all_finite(tree: chex.ArrayTree) -> chex.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.stack(leaves).all() if leaves else jnp.array(True)


def guarded_update(outer_tx: optax.GradientTransformation, grads: chex.ArrayTree,
                   outer_state: chex.ArrayTree, theta: chex.ArrayTree, ok: chex.Array
                   ) -> Tuple[chex.ArrayTree, chex.ArrayTree]:
  """An outer update that leaves theta and the outer state untouched unless ``ok``.

  Non-finite meta-gradients are zeroed before the update is computed, so no
  NaN enters even the branch that is thrown away.
  """
  safe_grads = jax.tree_util.tree_map(lambda g: jnp.where(ok, g, 0.0), grads)
  updates, new_outer = outer_tx.update(safe_grads, outer_state, theta)
  new_theta = optax.apply_updates(theta, updates)
  pick = lambda new, old: jnp.where(ok, new, old)
  return (jax.tree_util.tree_map(pick, new_theta, theta),
          jax.tree_util.tree_map(pick, new_outer, outer_state))


def for_meta_batch(lopt: Any, params: chex.ArrayTree,
                   mesh: Optional[jax.sharding.Mesh] = None) -> Any:
  """``lopt`` as it should run over the optimizees of ``params`` (leaves [batch, ...]),
  each device its share of the batch given a ``mesh``: ``lopt.for_meta_batch(batch,
  coordinates)`` where it has one (the fused LSTM kernels size their backward pass
  by it), else ``lopt``."""
  tune = getattr(lopt, "for_meta_batch", None)
  leaves = jax.tree_util.tree_leaves(params)
  if tune is None or not leaves:
    return lopt
  devices = mesh.devices.size if mesh is not None else 1
  coordinates = sum(int(np.prod(x.shape[1:])) for x in leaves)
  return tune(max(leaves[0].shape[0] // devices, 1), coordinates)


def per_optimizee_grads(one: Callable, lopt: Any, params: chex.ArrayTree,
                        mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """(theta, states, keys, optimizee) -> ((losses, aux), grads), each per optimizee:
  ``one(lopt, theta, state, key, optimizee) -> (loss, aux)`` differentiated in theta,
  vmapped over the batch (per device, given a ``mesh``), with ``lopt`` as
  ``for_meta_batch`` sizes it for the optimizees of ``params``."""
  fn = jax.value_and_grad(functools.partial(one, for_meta_batch(lopt, params, mesh)),
                          has_aux=True)
  return sharding_lib.per_device(jax.vmap(fn, in_axes=(None, 0, 0, None)), mesh,
                                 (False, True, True, False))


def make_init_states_fn(lopt: Any, batch_size: int) -> Callable:
  """(theta, key, optimizee) -> UnrollState batched over ``batch_size`` fresh optimizees."""

  def init_states(theta, key, optimizee):
    tx = lopt.transform(theta)
    keys = jax.random.split(key, batch_size)
    return jax.vmap(lambda k: init_state(tx, optimizee, k))(keys)

  return init_states


def make_init_states(lopt: Any, batch_size: int) -> Callable:
  """jit(theta, key, optimizee) -> UnrollState batched over ``batch_size`` fresh optimizees."""
  return jax.jit(make_init_states_fn(lopt, batch_size))


def _select(mask: chex.Array, new: chex.ArrayTree, old: chex.ArrayTree) -> chex.ArrayTree:
  """Per-optimizee choice: row b of the result is new[b] where mask[b], else old[b]."""
  def pick(n, o):
    return jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o)
  return jax.tree_util.tree_map(pick, new, old)


def make_meta_step(lopt: Any, outer_tx: optax.GradientTransformation, segment_length: int,
                   meta_loss: str = "sum", second_order: bool = False,
                   divergence_bound: float = 1e3, remat: Optional[str] = None,
                   remat_chunk: int = 0, scan_unroll: int = 1,
                   mesh: Optional[jax.sharding.Mesh] = None,
                   residual_tape: bool = False) -> Callable:
  """Returns jit(meta_step)(theta, outer_state, states, key, optimizee).

  ``states`` is an UnrollState batched over optimizees; the step unrolls each
  for ``segment_length`` steps, differentiates each optimizee's meta-loss
  w.r.t. theta, and applies the outer optimizer to the mean meta-gradient.

  An optimizee diverges when a loss of the segment is non-finite or exceeds
  ``divergence_bound`` x its episode's initial loss, or its meta-gradient is
  non-finite. Its meta-gradient is left out of the mean (it is dropped after
  differentiation, so its NaNs cannot leak into the others'), and it is reset
  to a fresh optimizee: its episode ends. If no optimizee is left, or the
  mean is non-finite, theta and the outer state are not updated
  (``skipped``). The returned states carry no gradient into the next segment
  (their buffers are donated: pass each step the states the last returned).

  ``remat`` (None, "update" or "update_dots", see ``l2ojax.meta.remat``)
  recomputes the learned optimizer's update in the backward pass instead of
  saving its activations: same result, a fraction of the memory; "auto" is
  "update" on the CPU and None on accelerators.
  ``remat_chunk`` > 0 also recomputes the segment in chunks of that many steps,
  keeping the recurrent state of the chunk boundaries only (what bounds the
  memory at large B); ``scan_unroll`` sets the steps per iteration of the
  compiled loop. Inputs placed on a mesh (``l2ojax.meta.sharding``) run
  sharded with no other change; with that ``mesh`` given too, each device
  unrolls its optimizees in a program of its own (``sharding.per_device``),
  which the fused Pallas kernels (``lstm_kernel="pallas"``) need.
  ``residual_tape``: the fused LSTM kernels keep each step's saved inputs in
  one buffer for the segment, written and read in place
  (``unroll.scan_steps``); not with ``remat`` or ``remat_chunk``.
  """
  loss_fn = losses_lib.get(meta_loss)
  remat_lib.check_policy(remat)
  if remat_chunk < 0 or scan_unroll < 1:
    raise ValueError(f"make_meta_step: remat_chunk={remat_chunk} must be >= 0 and "
                     f"scan_unroll={scan_unroll} >= 1")
  if residual_tape and (remat_lib.resolve(remat) or remat_chunk):
    raise ValueError(f"make_meta_step: residual_tape with remat={remat!r} (here "
                     f"{remat_lib.resolve(remat)!r}), remat_chunk={remat_chunk}: a recomputed "
                     "update would rewrite the tape; turn remat off")

  def one(lopt, theta, state, key, optimizee):
    tx = remat_lib.checkpointed(lopt.transform(theta), remat)
    state, fs = unroll(tx, optimizee, state, key, segment_length, second_order,
                       scan_unroll=scan_unroll, remat_chunk=remat_chunk,
                       residual_tape=residual_tape)
    return loss_fn(fs, state.initial_loss), (state, fs)

  def meta_step(theta, outer_state, states: UnrollState, key, optimizee
                ) -> Tuple[Any, Any, UnrollState, Dict[str, chex.Array]]:
    batch = states.step.shape[0]
    per_optimizee = per_optimizee_grads(one, lopt, states.params, mesh)
    k_seg, k_reset = jax.random.split(key)
    (ml, (states, fs)), grads = per_optimizee(theta, states, jax.random.split(k_seg, batch),
                                              optimizee)
    grads_ok = jax.vmap(tree_all_finite)(grads)
    alive = (jnp.all(jnp.isfinite(fs), axis=1) & jnp.isfinite(ml) & grads_ok
             & (jnp.max(fs, axis=1) <= divergence_bound * jnp.abs(states.initial_loss)))
    n_alive = jnp.sum(alive)
    denom = jnp.maximum(n_alive, 1).astype(jnp.float32)
    mean_grads = jax.tree_util.tree_map(
        lambda g: jnp.sum(_select(alive, g, jnp.zeros_like(g)), axis=0) / denom, grads)
    ok = (n_alive > 0) & tree_all_finite(mean_grads)
    theta, outer_state = guarded_update(outer_tx, mean_grads, outer_state, theta, ok)
    states = jax.lax.stop_gradient(states)
    # Fresh optimizees are drawn only in a segment where one diverged: not on every step.
    states = jax.lax.cond(
        jnp.all(alive), lambda s: s,
        lambda s: _select(alive, s, make_init_states_fn(lopt, batch)(theta, k_reset, optimizee)),
        states)
    live_fs = jnp.where(alive[:, None], fs, 0.0)
    metrics = {"meta_loss": jnp.sum(jnp.where(alive, ml, 0.0)) / denom,
               "mean_loss": jnp.sum(live_fs) / (denom * fs.shape[1]),
               "last_loss": jnp.sum(live_fs[:, -1]) / denom,
               "diverged": batch - n_alive, "skipped": (~ok).astype(jnp.int32),
               "grad_norm": optax.global_norm(mean_grads)}  # before the outer clipping
    return theta, outer_state, states, metrics

  return jax.jit(meta_step, donate_argnums=(2,))


def make_validate(lopt: Any, num_optimizees: int) -> Callable:
  """jit(theta, key, optimizee, num_steps) -> losses [num_optimizees, num_steps + 1]."""

  def validate(theta, key, optimizee, num_steps):
    keys = jax.random.split(key, num_optimizees)
    return batch_rollout(lopt.transform(theta), optimizee, keys, num_steps)

  return jax.jit(validate, static_argnums=3)
