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


def pallas_triton(what: str, instead: str):
  """(pallas, its Triton backend), imported when a kernel is built: an experimental
  API whose changes should break the fused kernel (``what``), not the import of
  l2ojax; the error names the way out (``instead``)."""
  try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
  except ImportError as e:
    raise ImportError(f"{what} needs Pallas's Triton backend (jax.experimental.pallas.triton), "
                      f"which jax {jax.__version__} does not provide ({e}); use {instead}") from e
  return pl, plt


def padded(size: int) -> int:
  """The power of two >= 16 that holds ``size``: Triton's product tiles."""
  return max(16, 1 << (size - 1).bit_length())
