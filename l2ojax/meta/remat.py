"""Rematerialisation of a learned optimizer's update inside the unroll.

Backprop through a segment keeps, for every step, everything the update of
the learned optimizer computed: the gate pre-activations and their sigmoid /
tanh values of every LSTM layer, i.e. batch x steps x coordinates x
(several x hidden) floats. Wrapping the update in ``jax.checkpoint`` keeps only
its inputs (the gradient and the recurrent state, which the scan carries
anyway) and recomputes the rest in the backward pass: about one more forward
of the optimizer per step for a several-fold smaller footprint, which is what
lets a large meta-batch fit on one accelerator.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import jax
import optax

# name -> jax.checkpoint policy (None: save nothing but the inputs).
POLICIES: Dict[str, Optional[Callable]] = {
    # recompute the whole update in the backward pass.
    "update": jax.checkpoint_policies.nothing_saveable,
    # keep the matmul outputs (gate pre-activations), recompute the cheap
    # elementwise gate math: more memory than "update", less recompute.
    "update_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


AUTO = "auto"


def resolve(remat: Optional[str]) -> Optional[str]:
  """``"auto"``: ``"update"`` on the CPU (recomputing moves fewer bytes than
  storing, and memory traffic is what a CPU meta-step waits on), None on an
  accelerator (the LSTM's written-out gradient keeps little per step, and a
  recompute adds kernels to a step that their launches already bound).
  ``""`` is None; a policy name is itself."""
  if remat == AUTO:
    return "update" if jax.default_backend() == "cpu" else None
  return remat or None


def check_policy(remat: Optional[str]) -> None:
  if remat not in (None, "", AUTO) and remat not in POLICIES:
    raise ValueError(f"remat={remat!r}; allowed: None, {AUTO!r} or one of {sorted(POLICIES)}")


def checkpointed(tx: optax.GradientTransformation,
                 remat: Optional[str]) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``update`` is recomputed in the backward pass (``remat`` policy).

  ``remat=None`` returns ``tx`` unchanged. The result is the same function of
  its inputs; only what autodiff saves differs.
  """
  check_policy(remat)
  remat = resolve(remat)
  if remat is None:
    return tx
  tx = optax.with_extra_args_support(tx)

  def update_with_extras(updates, state, params, extra_args):
    return tx.update(updates, state, params, **extra_args)

  update = jax.checkpoint(update_with_extras, policy=POLICIES[remat])

  def update_fn(updates, state, params=None, **extra_args):
    return update(updates, state, params, extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)
