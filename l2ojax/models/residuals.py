"""Where a loop's steps keep their backward-pass residuals.

In a loop of steps, backprop stacks every array a step keeps for the backward
pass in a kernel of its own (a dynamic-update-slice per array and step on a
GPU). A learned optimizer whose step keeps dozens of small arrays (L2O-Scale:
momenta, features, gates of three recurrent levels) spends as many kernels
per step on that alone; ``packed`` keeps the same values as one flat array
per dtype, stacked in one kernel. A kernel that writes its own residual can
instead keep it on a tape of the loop's (``taped_scan``, below), written and
read in place.
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


# A loop's residual tape.
#
# Backprop through ``lax.scan`` stacks what each step keeps for the backward
# pass: on a GPU a kernel writes the step's residual to memory, the loop then
# copies it into the stacked array, and the backward loop copies slot t out
# again before the kernel that reads it (a custom call gets its operands as
# buffers of their own). ``taped_scan`` gives a kernel that keeps a residual
# a tape instead: one buffer for all the steps, which the forward kernel
# writes its slot of in place and the backward kernel reads its slot of in
# place. The tape reaches the backward pass as the cotangent of the loop's
# carry: ``_release`` makes the tape the cotangent of the final tape, and
# each step's VJP passes its cotangent on unchanged, so the backward loop
# carries the same buffer back, step by step, like any other carry.
#
# Likewise a loop-invariant value whose gradient every step adds to (a
# learned optimizer's weights) can be an accumulator: the loop carries it
# unchanged, so that its cotangent is a carry of the backward loop, which
# each step's VJP adds its share to (a kernel can add in place) instead of
# the loop adding each step's gradient into a sum of its own in another
# kernel. The values and gradients are those of ``lax.scan``.


class _Recording:
  """The tapes (and accumulators) of one step of a ``taped_scan`` (``tapes`` None:
  finding them)."""

  def __init__(self, steps: int, tapes=None, accumulators=None, slot=None):
    self.steps, self.tapes, self.accumulators, self.slot = steps, tapes, accumulators, slot
    self.requests: List[jax.ShapeDtypeStruct] = []
    self.given: List = []  # the accumulators' values as the step's code passed them
    self.calls = 0


_RECORDING: List[_Recording] = []


def record(rows: int, width: int, dtype, write: Callable, accumulator=None):
  """``write(tape, slot, accumulator) -> (result, new tape, new accumulator)`` inside
  a step of ``taped_scan`` (``tape`` [steps x rows, width] of ``dtype``, ``slot``
  int32 [1]: the step's index; the step's rows of the tape are its residual),
  and its ``result``; None anywhere else (the caller then keeps its residual as
  usual).

  ``accumulator``: None, or a value from outside the loop (the same object in
  every step) that ``write`` gets carried by the loop, returns unchanged, and
  whose cotangent its VJP adds its gradient to (``write`` then gets no other
  gradient to that value: it must not also close over it).

  ``write`` is called at most once per call of ``record``, and each step must
  call ``record`` in the same order with the same shapes.
  """
  if not _RECORDING:
    return None
  rec = _RECORDING[-1]
  i, rec.calls = rec.calls, rec.calls + 1
  shape = jax.ShapeDtypeStruct((rec.steps * rows, width), jnp.dtype(dtype))
  rec.given.append(accumulator)
  if rec.tapes is None:  # finding the tapes: shapes only
    rec.requests.append(shape)
    return write(jnp.zeros(shape.shape, shape.dtype), jnp.zeros((1,), jnp.int32),
                 accumulator)[0]
  tape = rec.tapes[i]
  if (tape.shape, tape.dtype) != (shape.shape, shape.dtype):
    raise ValueError(f"residuals.record: call {i} of the step asks for a tape "
                     f"{shape.shape} {shape.dtype}; the step first asked for "
                     f"{tape.shape} {tape.dtype}")
  result, rec.tapes[i], rec.accumulators[i] = write(tape, rec.slot, rec.accumulators[i])
  return result


@jax.custom_vjp
def _release(tapes, outputs):
  """``outputs``, whose backward pass starts the tapes back: their cotangent is
  the tapes themselves (``taped_scan``)."""
  del tapes
  return outputs


def _release_fwd(tapes, outputs):
  return outputs, tapes


def _release_bwd(tapes, cotangent):
  return tapes, cotangent


_release.defvjp(_release_fwd, _release_bwd)


def _find(body: Callable, carry, x, steps: int) -> _Recording:
  """What one step of ``body`` records, from a trace of its own."""
  finding = _Recording(steps)
  _RECORDING.append(finding)
  try:
    # a new function each time: a trace that eval_shape had cached would not run body
    jax.eval_shape(lambda c, x: body(c, x), carry, x)
  finally:
    _RECORDING.pop()
  return finding


def taped_scan(body: Callable, carry, xs, unroll: int = 1):
  """``jax.lax.scan(body, carry, xs, unroll=unroll)``, where every ``record`` in
  ``body`` keeps its residual on a tape of the loop's, and its accumulator in
  the loop's carry (see above).

  ``body`` must call no ``record`` inside a transformation of its own that
  retraces it (``jax.checkpoint``, a nested ``jit``); with no ``record`` in
  ``body`` this is ``lax.scan``. Differentiate it in reverse mode only
  (forward mode gets no tape).
  """
  steps = jax.tree_util.tree_leaves(xs)[0].shape[0]
  x0 = jax.tree_util.tree_map(lambda a: a[0], xs)
  finding = _find(body, carry, x0, steps)
  if not finding.requests:
    return jax.lax.scan(body, carry, xs, unroll=unroll)
  # an accumulator must come from outside the loop: the same object in every trace
  again = (_find(body, carry, x0, steps).given
           if any(a is not None for a in finding.given) else finding.given)
  assert len(again) == len(finding.given)
  for i, (a, b) in enumerate(zip(finding.given, again)):
    if a is not b:
      raise ValueError(f"residuals.taped_scan: the accumulator of record call {i} is "
                       "computed inside the loop's step; pass one from outside the loop "
                       "(e.g. a learned optimizer's prepared weights), or None")

  def step(c, x_slot):
    inner, tapes, accumulators = c
    x, slot = x_slot
    rec = _Recording(steps, list(tapes), list(accumulators), slot)
    _RECORDING.append(rec)
    try:
      inner, y = body(inner, x)
    finally:
      _RECORDING.pop()
    if rec.calls != len(tapes):
      raise ValueError(f"residuals.taped_scan: the step recorded {rec.calls} residuals, "
                       f"its first trace {len(tapes)}")
    return (inner, tuple(rec.tapes), tuple(rec.accumulators)), y

  # uninitialized where the backend allows (every slot is written before it is read): a
  # GPU then spends no pass over the whole tape on zeros, as it does for lax.scan's stack
  tapes = tuple(jax.lax.empty(r.shape, r.dtype) for r in finding.requests)
  # the slots as a loop input: the backward loop reads them there (a counter in the
  # carry would be a residual stacked by the loop)
  slots = jnp.arange(steps, dtype=jnp.int32)[:, None]
  (carry, tapes, _), ys = jax.lax.scan(step, (carry, tapes, tuple(finding.given)),
                                       (xs, slots), unroll=unroll)
  return _release(tapes, (carry, ys))
