"""Where a fused GPU kernel runs and where XLA's ops stand in for it."""
from __future__ import annotations

from typing import Callable

import jax

# Kernel choices of an op with a fused GPU version: XLA's ops everywhere, the
# fused kernel where the program is lowered for CUDA, or the kernel's program
# interpreted on any backend (tests).
KERNELS = ("xla", "pallas", "pallas_interpret")


def on_gpu(kernel: str, fused: Callable, xla: Callable, *args):
  """``fused(*args)`` where the program is lowered for a CUDA GPU (or interpreted,
  ``kernel="pallas_interpret"``), ``xla(*args)`` elsewhere: the same function.

  A Pallas kernel has no derivative of its own, so the fused version takes
  ``xla``'s: a gradient through it (or a gradient of a gradient it computes)
  differentiates XLA's ops. Both take every differentiable value as an
  argument, closing over none.
  """
  kernel_only = fused
  fused = jax.custom_jvp(kernel_only)
  fused.defjvp(lambda primals, tangents: (kernel_only(*primals),
                                           jax.jvp(xla, primals, tangents)[1]))
  if kernel == "pallas_interpret":
    return fused(*args)
  return jax.lax.platform_dependent(*args, cuda=fused, default=xla)
