"""Matrix products with weights over the rows of a coordinatewise cell or a minibatch,
written so that XLA compiles them, and their gradients, to few kernels on a GPU.

Two shapes compile badly as plain ``a @ w``: a product of a few rows (a hierarchical
optimizer's per-tensor and global levels) is a GEMM kernel of its own, launched per
step; and a weights' gradient summed over many rows (a product with K = rows, one
row per optimizee coordinate) is split by XLA into padded copies of both operands, a
batched product and a reduction. The same functions, up to float rounding.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np

# At most this many rows, a product with a weight matrix is written as elementwise
# products and a sum, which XLA fuses with the neighbouring elementwise work. Read
# when a product is traced (the benchmark's --kernel_constant=products.SMALL_ROWS=N).
SMALL_ROWS = 64

# Rows of each partial product of a weights' gradient over many rows on a GPU.
OUTER_CHUNK_ROWS = 512


def _rows(a: chex.Array) -> int:
  return int(np.prod(a.shape[:-1]))


def with_ones(a: chex.Array) -> chex.Array:
  """[a, 1]: the operand whose product with a cotangent gives a weight matrix's
  and its bias's gradients at once (one kernel, not a product and a row sum)."""
  return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def matmul(a: chex.Array, w: chex.Array) -> chex.Array:
  """a [..., k] @ w [k, m], as elementwise products and a sum where a has at most
  ``SMALL_ROWS`` rows."""
  if _rows(a) <= SMALL_ROWS:
    return jnp.sum(a[..., :, None] * w, axis=-2)
  return a @ w


def row_chunks(rows: int, most: int = OUTER_CHUNK_ROWS) -> int:
  """The fewest chunks of at most ``most`` rows each that divide ``rows`` evenly,
  looked for up to twice the fewest possible; 1 where none does."""
  fewest = -(-rows // most)
  return next((k for k in range(fewest, 2 * fewest + 1) if rows % k == 0), 1)


def summed_outer(a: chex.Array, d: chex.Array) -> chex.Array:
  """a^T d over all rows of a [..., fa] and d [..., fd]: [fa, fd]. Where the program
  is lowered for CUDA, as partial products over ``row_chunks`` (then summed): no
  padded copies."""
  a, d = a.reshape(-1, a.shape[-1]), d.reshape(-1, d.shape[-1])
  if a.shape[0] <= SMALL_ROWS:
    return jnp.sum(a[:, :, None] * d[:, None, :], axis=0)
  k = row_chunks(a.shape[0])
  if k == 1:
    return a.T @ d
  return jax.lax.platform_dependent(a, d, cuda=functools.partial(chunked_summed_outer, k=k),
                                    default=lambda a, d: a.T @ d)


def chunked_summed_outer(a: chex.Array, d: chex.Array, k: int) -> chex.Array:
  """a^T d of [rows, fa] and [rows, fd] as ``k`` partial products of rows / k rows each
  (``k`` divides the rows), summed."""
  per = a.shape[0] // k
  return jnp.einsum("kri,krj->kij", a.reshape(k, per, -1), d.reshape(k, per, -1)).sum(0)


@jax.custom_vjp
def rows_matmul(a: chex.Array, w: chex.Array) -> chex.Array:
  """a [..., k] @ w [k, m] over many rows, whose gradient for ``w`` is
  ``summed_outer``'s. Reverse mode only (a ``jax.custom_vjp``)."""
  return a @ w


def _rows_matmul_fwd(a, w):
  return a @ w, (a, w)


def _rows_matmul_bwd(res, d):
  a, w = res
  return d @ w.T, summed_outer(a, d)


rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


@jax.custom_vjp
def rows_linear(a: chex.Array, w: chex.Array, b: chex.Array) -> chex.Array:
  """a [..., k] @ w + b over many rows, whose gradient for w and b is one
  ``summed_outer`` of [a, 1]: no reduction of its own for the bias (one that XLA
  may fuse into, and compute again in, each kernel reading the gradient). On a GPU
  the bias's gradient is then in the products' precision (TF32 by default), like
  w's. Reverse mode only (a ``jax.custom_vjp``)."""
  return a @ w + b


def _rows_linear_fwd(a, w, b):
  return a @ w + b, (a, w)


def _rows_linear_bwd(res, d):
  a, w = res
  wb = summed_outer(with_ones(a), d)
  return d @ w.T, wb[:-1], wb[-1]


rows_linear.defvjp(_rows_linear_fwd, _rows_linear_bwd)
