"""Imitation learning: an analytical teacher moves the optimizee, the learned
optimizer learns to reproduce the teacher's updates.

The teacher is any optax transformation. In an imitation segment the optimizee
only ever follows the teacher; the learner sees the teacher's gradients through
its own recurrent state (its ``init``/``update``), and its update is compared
with the teacher's. Nothing here knows which learned optimizer it trains.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import optax

from l2ojax.meta import unroll as unroll_lib
from l2ojax.meta.step import guarded_update, per_optimizee_grads, tree_all_finite
from l2ojax.models import residuals
from l2ojax.optimizees.base import Optimizee

TEACHERS: Dict[str, Callable[[float], optax.GradientTransformation]] = {
    "adam": lambda lr: optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8),  # the paper's
    "rmsprop": lambda lr: optax.rmsprop(lr),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
}


def make_teacher(name: str = "adam", learning_rate: float = 0.01) -> optax.GradientTransformation:
  if name not in TEACHERS:
    raise ValueError(f"imitation.teacher={name!r}; allowed: {sorted(TEACHERS)}")
  if not learning_rate > 0:
    raise ValueError(f"imitation.learning_rate must be > 0, got {learning_rate}")
  return TEACHERS[name](learning_rate)


class ImitationState(NamedTuple):
  """One optimizee mid-episode under a teacher, and the learner shadowing it."""
  params: chex.ArrayTree
  instance: chex.ArrayTree
  teacher_state: chex.ArrayTree
  learner_state: chex.ArrayTree
  step: chex.Array  # teacher steps taken in this episode


def init_imitation_state(teacher: optax.GradientTransformation,
                         learner: optax.GradientTransformation, optimizee: Optimizee,
                         key: chex.PRNGKey) -> ImitationState:
  """A fresh optimizee, a fresh teacher state and a fresh learner state."""
  k_init, _ = jax.random.split(key)  # the same init as unroll.init_state for the same key
  params, instance = optimizee.init(k_init)
  return ImitationState(params, instance, teacher.init(params), learner.init(params),
                        jnp.zeros((), jnp.int32))


def imitation_loss(teacher_updates: chex.ArrayTree, learner_updates: chex.ArrayTree
                   ) -> chex.Array:
  """0.5 * sum((teacher - learner)^2) / number of coordinates (the paper's)."""
  sq = jax.tree_util.tree_map(lambda t, l: jnp.sum(jnp.square(t - l)),
                              teacher_updates, learner_updates)
  n = sum(x.size for x in jax.tree_util.tree_leaves(teacher_updates))
  return 0.5 * sum(jax.tree_util.tree_leaves(sq)) / n


def _call_update(tx, grads, opt_state, params, loss):
  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return tx.update(grads, opt_state, params, value=loss)
  return tx.update(grads, opt_state, params)


def imitation_unroll(teacher: optax.GradientTransformation, learner: optax.GradientTransformation,
                     optimizee: Optimizee, state: ImitationState, key: chex.PRNGKey,
                     num_steps: int, k: int = 1, residual_tape: bool = False
                     ) -> Tuple[ImitationState, chex.Array, chex.Array]:
  """``num_steps`` learner steps, each labelled by ``k`` teacher steps.

  At each learner step the learner sees the gradient at the current params and
  proposes an update; the label is the teacher's total displacement over its
  next ``k`` steps (``k = 1``: the paper's, the teacher's update on the same
  gradient). The optimizee moves by the teacher's updates only.

  Returns (state, imitation losses [num_steps], optimizee losses
  [num_steps * k + 1]). With ``k = 1`` the same key draws the same minibatches
  as ``unroll.unroll``, so the params follow ``unroll(teacher, ...)`` exactly.
  ``residual_tape``: the learner steps' loop is a ``residuals.taped_scan``
  (``unroll.scan_steps``'s option of that name).
  """
  if k < 1:
    raise ValueError(f"imitation.k must be >= 1, got {k}")
  keys = jax.random.split(key, num_steps * k + 1)
  xs, loss_and_grad = unroll_lib.step_inputs(optimizee, keys[:-1])

  def teacher_step(carry, x):
    params, t_state = carry
    loss, grads = loss_and_grad(params, state.instance, x)
    updates, t_state = _call_update(teacher, grads, t_state, params, loss)
    return (optax.apply_updates(params, updates), t_state), (loss, grads, updates)

  def body(carry, step_xs):
    params, t_state, l_state = carry
    (new_params, t_state), (losses, grads, updates) = jax.lax.scan(
        teacher_step, (params, t_state), step_xs)
    first = lambda tree: jax.tree_util.tree_map(lambda x: x[0], tree)
    g0 = jax.lax.stop_gradient(first(grads))
    label = jax.lax.stop_gradient(jax.tree_util.tree_map(lambda u: jnp.sum(u, 0), updates))
    learner_updates, l_state = _call_update(learner, g0, l_state, params, losses[0])
    new_params = jax.lax.stop_gradient(new_params)  # the learner never moves the optimizee
    return (new_params, t_state, l_state), (imitation_loss(label, learner_updates), losses)

  step_xs = jax.tree_util.tree_map(lambda a: a.reshape((num_steps, k) + a.shape[1:]), xs)
  loop = residuals.taped_scan if residual_tape else jax.lax.scan
  (params, t_state, l_state), (il, losses) = loop(
      body, (state.params, state.teacher_state, state.learner_state), step_xs)
  final_loss = optimizee.loss(params, state.instance, keys[-1])
  losses = jnp.concatenate([losses.reshape(-1), final_loss[None]])
  new_state = state._replace(params=params, teacher_state=t_state, learner_state=l_state,
                             step=state.step + num_steps * k)
  return new_state, il, losses


def make_init_imitation_states(lopt: Any, teacher: optax.GradientTransformation,
                               batch_size: int) -> Callable:
  """jit(theta, key, optimizee) -> ImitationState batched over ``batch_size`` optimizees."""

  def init_states(theta, key, optimizee):
    learner = lopt.transform(theta)
    keys = jax.random.split(key, batch_size)
    return jax.vmap(lambda kk: init_imitation_state(teacher, learner, optimizee, kk))(keys)

  return jax.jit(init_states)


def make_imitation_step(lopt: Any, teacher: optax.GradientTransformation,
                        outer_tx: optax.GradientTransformation, segment_length: int,
                        k: int = 1, mesh: Optional[jax.sharding.Mesh] = None,
                        residual_tape: bool = False) -> Callable:
  """Returns jit(imitation_step)(theta, outer_state, states, key, optimizee).

  One meta-update per segment: the imitation loss summed over the segment,
  averaged over the vmapped batch of optimizees, differentiated w.r.t. theta;
  a non-finite loss or gradient leaves theta and the outer state untouched.
  ``segment_length`` counts teacher steps, so it must be a multiple of ``k``.
  ``mesh``, ``residual_tape``: as ``step.make_meta_step``'s.
  """
  if segment_length % k:
    raise ValueError(f"meta.segment_length={segment_length} must be a multiple of "
                     f"imitation.k={k}")
  num_labels = segment_length // k

  def one(lopt, theta, state, kk, optimizee):
    learner = lopt.transform(theta)
    state, il, fs = imitation_unroll(teacher, learner, optimizee, state, kk, num_labels, k,
                                     residual_tape)
    return jnp.sum(il), (state, fs)

  def imitation_step(theta, outer_state, states: ImitationState, key, optimizee
                     ) -> Tuple[Any, Any, ImitationState, Dict[str, chex.Array]]:
    # each optimizee's loss and gradient (per device, given a mesh), then their means
    per_optimizee = per_optimizee_grads(one, lopt, states.params, mesh)
    keys = jax.random.split(key, states.step.shape[0])
    (ils, (states, fs)), grads = per_optimizee(theta, states, keys, optimizee)
    il = jnp.mean(ils)
    grads = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
    ok = tree_all_finite(grads) & jnp.isfinite(il)
    theta, outer_state = guarded_update(outer_tx, grads, outer_state, theta, ok)
    metrics = {"imitation_loss": il, "mean_loss": jnp.mean(fs), "last_loss": jnp.mean(fs[:, -1]),
               "skipped": (~ok).astype(jnp.int32), "grad_norm": optax.global_norm(grads)}
    return theta, outer_state, jax.lax.stop_gradient(states), metrics

  return jax.jit(imitation_step, donate_argnums=(2,))
