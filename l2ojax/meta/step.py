"""The jitted meta-step: a vmapped batch of truncated unrolls, one outer update."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import optax

from l2ojax.meta import losses as losses_lib
from l2ojax.meta import remat as remat_lib
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


def make_init_states(lopt: Any, batch_size: int) -> Callable:
  """jit(theta, key, optimizee) -> UnrollState batched over ``batch_size`` fresh optimizees."""

  def init_states(theta, key, optimizee):
    tx = lopt.transform(theta)
    keys = jax.random.split(key, batch_size)
    return jax.vmap(lambda k: init_state(tx, optimizee, k))(keys)

  return jax.jit(init_states)


def make_meta_step(lopt: Any, outer_tx: optax.GradientTransformation, segment_length: int,
                   meta_loss: str = "sum", second_order: bool = False,
                   remat: Optional[str] = None) -> Callable:
  """Returns jit(meta_step)(theta, outer_state, states, key, optimizee).

  ``states`` is an UnrollState batched over optimizees; the step unrolls each
  for ``segment_length`` steps, differentiates the mean meta-loss w.r.t.
  theta, and applies the outer optimizer unless the meta-gradient is
  non-finite. The returned states carry no gradient into the next segment
  (their buffers are donated: pass each step the states the last returned).

  ``remat`` (None, "update" or "update_dots", see ``l2ojax.meta.remat``)
  recomputes the learned optimizer's update in the backward pass instead of
  saving its activations: same result, a fraction of the memory. Inputs placed
  on a mesh (``l2ojax.meta.sharding``) run sharded with no other change.
  """
  loss_fn = losses_lib.get(meta_loss)
  remat_lib.check_policy(remat)

  def segment_loss(theta, states, key, optimizee):
    tx = remat_lib.checkpointed(lopt.transform(theta), remat)
    keys = jax.random.split(key, states.step.shape[0])

    def one(state, k):
      state, fs = unroll(tx, optimizee, state, k, segment_length, second_order)
      return loss_fn(fs, state.initial_loss), (state, fs)

    per_optimizee, (states, fs) = jax.vmap(one)(states, keys)
    return jnp.mean(per_optimizee), (states, fs)

  def meta_step(theta, outer_state, states: UnrollState, key, optimizee
                ) -> Tuple[Any, Any, UnrollState, Dict[str, chex.Array]]:
    (ml, (states, fs)), grads = jax.value_and_grad(segment_loss, has_aux=True)(
        theta, states, key, optimizee)
    ok = tree_all_finite(grads) & jnp.isfinite(ml)
    theta, outer_state = guarded_update(outer_tx, grads, outer_state, theta, ok)
    metrics = {"meta_loss": ml, "mean_loss": jnp.mean(fs), "last_loss": jnp.mean(fs[:, -1]),
               "skipped": (~ok).astype(jnp.int32)}
    return theta, outer_state, jax.lax.stop_gradient(states), metrics

  return jax.jit(meta_step, donate_argnums=(2,))


def make_validate(lopt: Any, num_optimizees: int) -> Callable:
  """jit(theta, key, optimizee, num_steps) -> losses [num_optimizees, num_steps + 1]."""

  def validate(theta, key, optimizee, num_steps):
    keys = jax.random.split(key, num_optimizees)
    return batch_rollout(lopt.transform(theta), optimizee, keys, num_steps)

  return jax.jit(validate, static_argnums=3)
