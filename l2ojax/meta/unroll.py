"""Truncated unrolls of any optax transformation over an optimizee, with lax.scan."""
from __future__ import annotations

from typing import Any, NamedTuple, Tuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from l2ojax.models import residuals
from l2ojax.optimizees.base import Optimizee


class UnrollState(NamedTuple):
  """One optimizee mid-episode: what a segment carries to the next."""
  params: chex.ArrayTree
  instance: chex.ArrayTree
  opt_state: chex.ArrayTree
  step: chex.Array          # optimizee steps taken in this episode
  initial_loss: chex.Array  # f(x_0) of the episode, for ratio-style meta-losses


def init_state(tx: optax.GradientTransformation, optimizee: Optimizee,
               key: chex.PRNGKey) -> UnrollState:
  """A fresh optimizee and a fresh optimizer state for it (one episode's start)."""
  k_init, k_loss = jax.random.split(key)
  params, instance = optimizee.init(k_init)
  initial_loss = optimizee.loss(params, instance, k_loss)
  return UnrollState(params, instance, tx.init(params), jnp.zeros((), jnp.int32),
                     jnp.asarray(initial_loss, jnp.float32))


def _call_update(tx, grads, opt_state, params, loss):
  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return tx.update(grads, opt_state, params, value=loss)
  return tx.update(grads, opt_state, params)


@jax.custom_vjp
def _first_order_loss(params: chex.ArrayTree, loss: chex.Array,
                      grads: chex.ArrayTree) -> chex.Array:
  """``loss`` = f(params), differentiable in ``params`` through the known ``grads``.

  In a first-order unroll the step already computed ``grads`` = df/dparams on the
  same minibatch; backprop through the loss itself would recompute the
  optimizee's backward pass and keep its activations (the minibatch images, the
  hidden layers) for every step. The derivative is the same.
  """
  del params, grads
  return loss


def _first_order_loss_fwd(params, loss, grads):
  del params
  return loss, grads


def _first_order_loss_bwd(grads, ct):
  zeros = jax.tree_util.tree_map(jnp.zeros_like, grads)
  return (jax.tree_util.tree_map(lambda g: (ct * g).astype(g.dtype), grads),
          jnp.zeros_like(ct), zeros)


_first_order_loss.defvjp(_first_order_loss_fwd, _first_order_loss_bwd)


def step_inputs(optimizee: Optimizee, step_keys: chex.Array) -> Tuple[Any, Any]:
  """(xs, loss_and_grad): what each step's loss takes, stacked over steps, and
  ``(params, instance, x) -> (loss, gradient)``.

  An optimizee that draws minibatches exposes ``minibatch(key)`` and
  ``batch_loss(params, instance, batch)`` (with ``loss(params, instance, key)
  == batch_loss(params, instance, minibatch(key))``); then every step's
  minibatch is drawn before the loop, in one batched draw instead of a chain
  of small random-number kernels per step. The values are the same. Its
  ``batch_value_and_grad``, where it has one (a fused kernel), replaces
  ``jax.value_and_grad(batch_loss)`` (and ``scan_steps`` with a flat carry
  prefers its ``flat_batch_value_and_grad(flat, unravel, instance, batch)``).
  """
  if hasattr(optimizee, "minibatch") and hasattr(optimizee, "batch_loss"):
    loss_and_grad = getattr(optimizee, "batch_value_and_grad",
                            jax.value_and_grad(optimizee.batch_loss))
    return jax.vmap(optimizee.minibatch)(step_keys), loss_and_grad
  return step_keys, jax.value_and_grad(optimizee.loss)


def scan_steps(tx: optax.GradientTransformation, optimizee: Optimizee, state: UnrollState,
               step_keys: chex.Array, second_order: bool = False, *, unroll: int = 1,
               remat_chunk: int = 0, flat_carry: bool = True,
               residual_tape: bool = False) -> Tuple[UnrollState, chex.Array]:
  """One step of ``tx`` per key of ``step_keys`` (each key draws that step's minibatch).

  Returns the new state and the loss before each step ([len(step_keys)]).
  Splitting ``step_keys`` into consecutive chunks and scanning them in turn
  gives exactly the losses of one scan over all of them.

  ``unroll``: steps per iteration of the compiled loop (``lax.scan``'s).
  ``remat_chunk`` > 0: backprop keeps the carry (parameters and optimizer
  state) of every ``remat_chunk``-th step only and recomputes the steps in
  between, i.e. about n / k + k carries instead of n, for one more forward
  pass. ``flat_carry``: the loop carries the parameters as one flat vector
  when all leaves share a dtype: the update is one add (and its transpose
  one), and a learned optimizer ravels them anyway; a per-leaf optax
  transformation (Adam) compiles to fewer kernels per step without it (GPU,
  W2: 19 instead of 25). ``residual_tape``: the loop is a
  ``residuals.taped_scan``: a step whose learned optimizer records its
  residual (the fused LSTM kernels') writes it in place into one buffer for
  the segment, which the backward pass reads in place, rather than the loop
  stacking it (for reverse-mode differentiation of the segment; not with
  ``remat_chunk``). None of these changes the result.
  """
  if remat_chunk < 0 or unroll < 1:
    raise ValueError(f"scan_steps: remat_chunk={remat_chunk} must be >= 0 and "
                     f"unroll={unroll} >= 1")
  if residual_tape and remat_chunk:
    raise ValueError(f"scan_steps: residual_tape with remat_chunk={remat_chunk}: a "
                     "recomputed chunk would rewrite the tape; use one or the other")
  xs, loss_and_grad = step_inputs(optimizee, step_keys)

  flat_params = flat_carry and len(
      {jnp.result_type(p) for p in jax.tree_util.tree_leaves(state.params)}) == 1
  if flat_params:
    start, unravel = ravel_pytree(state.params)
  else:
    start, unravel = state.params, lambda p: p

  # an optimizee that computes a step's loss and gradient on the flat vector itself
  flat_loss_and_grad = (getattr(optimizee, "flat_batch_value_and_grad", None)
                        if flat_params and hasattr(optimizee, "minibatch") else None)

  def body(carry, x):
    carried, opt_state = carry
    params = unravel(carried)
    # first order: the step's loss and gradient are constants of the meta-gradient
    # (its derivative flows through _first_order_loss), so nothing differentiates them
    at = carried if second_order else jax.lax.stop_gradient(carried)
    if flat_loss_and_grad is not None:
      loss, flat_grads = flat_loss_and_grad(at, unravel, state.instance, x)
      grads = unravel(flat_grads)
    else:
      loss, grads = loss_and_grad(unravel(at), state.instance, x)
      flat_grads = ravel_pytree(grads)[0] if flat_params else None
    if not second_order:
      grads = jax.lax.stop_gradient(grads)
      # one saved vector per step for the backward pass, not one per leaf
      known = jax.lax.stop_gradient(flat_grads) if flat_params else grads
      loss = _first_order_loss(carried, jax.lax.stop_gradient(loss), known)
    updates, opt_state = _call_update(tx, grads, opt_state, params, loss)
    if flat_params:
      carried = carried + ravel_pytree(updates)[0].astype(carried.dtype)
    else:
      carried = optax.apply_updates(carried, updates)
    return (carried, opt_state), loss

  def scan(carry, xs):
    steps = jax.tree_util.tree_leaves(xs)[0].shape[0]
    loop = residuals.taped_scan if residual_tape else jax.lax.scan
    return loop(body, carry, xs, unroll=min(unroll, max(steps, 1)))

  carry = (start, state.opt_state)
  n = step_keys.shape[0]
  if 0 < remat_chunk < n:
    n_full = n - n % remat_chunk
    chunks = jax.tree_util.tree_map(
        lambda a: a[:n_full].reshape((n_full // remat_chunk, remat_chunk) + a.shape[1:]), xs)
    carry, losses = jax.lax.scan(jax.checkpoint(scan), carry, chunks)
    losses = losses.reshape(n_full)
    if n_full < n:
      carry, rest = scan(carry, jax.tree_util.tree_map(lambda a: a[n_full:], xs))
      losses = jnp.concatenate([losses, rest])
  else:
    carry, losses = scan(carry, xs)
  params, opt_state = carry
  new_state = state._replace(params=unravel(params), opt_state=opt_state, step=state.step + n)
  return new_state, losses


def unroll(tx: optax.GradientTransformation, optimizee: Optimizee, state: UnrollState,
           key: chex.PRNGKey, num_steps: int, second_order: bool = False, *,
           scan_unroll: int = 1, remat_chunk: int = 0, flat_carry: bool = True,
           residual_tape: bool = False) -> Tuple[UnrollState, chex.Array]:
  """Runs ``num_steps`` steps of ``tx`` on one optimizee.

  Returns the new state and the losses f(x_0), ..., f(x_T) ([num_steps + 1]),
  each on the minibatch of its own step. Unless ``second_order``, the
  optimizee gradient enters ``tx`` as a constant: meta-gradients flow through
  the parameters the updates produce, not through d(grad)/d(params).
  ``scan_unroll``, ``remat_chunk``, ``flat_carry``, ``residual_tape``: see ``scan_steps``.
  """
  keys = jax.random.split(key, num_steps + 1)
  new_state, losses = scan_steps(tx, optimizee, state, keys[:-1], second_order,
                                 unroll=scan_unroll, remat_chunk=remat_chunk,
                                 flat_carry=flat_carry, residual_tape=residual_tape)
  final_loss = optimizee.loss(new_state.params, state.instance, keys[-1])
  return new_state, jnp.concatenate([losses, final_loss[None]])


def rollout(tx: optax.GradientTransformation, optimizee: Optimizee, key: chex.PRNGKey,
            num_steps: int, scan_unroll: int = 1, flat_carry: bool = False) -> chex.Array:
  """Loss curve [num_steps + 1] of ``tx`` on the fresh optimizee that ``key`` draws.

  The same key gives the same init and the same minibatches to every ``tx``,
  so curves of different optimizers are directly comparable.
  """
  k_init, k_steps = jax.random.split(key)
  state = init_state(tx, optimizee, k_init)
  _, losses = unroll(tx, optimizee, state, k_steps, num_steps, scan_unroll=scan_unroll,
                     flat_carry=flat_carry)
  return losses


def batch_rollout(tx: optax.GradientTransformation, optimizee: Any, keys: chex.Array,
                  num_steps: int, scan_unroll: int = 1, flat_carry: bool = False) -> chex.Array:
  """``rollout`` vmapped over ``keys``: [len(keys), num_steps + 1]."""
  return jax.vmap(lambda k: rollout(tx, optimizee, k, num_steps, scan_unroll, flat_carry))(keys)
