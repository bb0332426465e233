"""A fused GPU kernel (Pallas, Triton backend): the loss and gradient of a
one-hidden-layer softmax MLP on a minibatch gathered from an image table.

XLA compiles ``jax.value_and_grad`` of the MNIST MLP's loss to ~13 kernels
(a split-K product and its reduction per dense layer, pads, the softmax,
each weight's gradient product, the bias sums), each a few microseconds of
launch latency on a GPU, for a few MFLOP of work: at one optimizee per
meta-batch they are half the kernels of an L2O-DM optimizee step. Here one
program per optimizee gathers its minibatch rows from the uint8 table
itself, accumulates the hidden layer in chunks of input columns, does the
softmax cross-entropy and the backward pass in registers, and reads the
rows a second time for the first layer's weight gradient: one launch.

Products are TF32 like XLA's default for float32 on GPUs; sizes are padded
inside the kernel to powers of two >= 16 (Triton's product tiles) with
masked loads, and the padded lanes contribute exactly zero.
"""
from __future__ import annotations

import functools
from typing import Tuple

import chex
import jax
import jax.numpy as jnp

from l2ojax import gpu

# Input columns per chunk of the first layer's products, and warps per program.
CHUNK = 64
NUM_WARPS = 4
# A program holds [rows, CHUNK] of the minibatch and [rows, hidden] and
# [rows, classes] tiles in registers: larger ones would spill.
MAX_ROWS = 512
MAX_WIDTH = 128


def _padded(size: int) -> int:
  return max(16, 1 << (size - 1).bit_length())


def _pallas():
  try:
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plt
  except ImportError as e:
    raise ImportError(f"mlp_kernel: the fused MLP kernel needs Pallas's Triton backend "
                      f"(jax.experimental.pallas.triton), which jax {jax.__version__} does not "
                      f"provide ({e}); use kernel='xla'") from e
  return pl, plt


def check_sizes(kernel: str, hidden_sizes, batch_size: int, num_classes: int) -> None:
  """Raises ValueError naming the field if an MLP cannot use the fused kernel."""
  if kernel not in gpu.KERNELS:
    raise ValueError(f"mnist_mlp kernel={kernel!r}; allowed: {gpu.KERNELS}")
  if len(hidden_sizes) != 1:
    raise ValueError(f"mnist_mlp kernel={kernel!r} fuses one hidden layer; hidden_sizes="
                     f"{tuple(hidden_sizes)} (use kernel='xla')")
  for field, value, limit in (("batch_size", batch_size, MAX_ROWS),
                              ("hidden_sizes[0]", hidden_sizes[0], MAX_WIDTH),
                              ("num_classes", num_classes, MAX_WIDTH)):
    if value > limit:
      raise ValueError(f"mnist_mlp kernel={kernel!r}: {field}={value} > {limit}, more than "
                       f"one program's registers hold (use kernel='xla')")


def _activation(name: str, z: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """(act(z), act'(z))."""
  if name == "sigmoid":
    h = jax.nn.sigmoid(z)
    return h, h * (1.0 - h)
  if name == "tanh":
    h = jnp.tanh(z)
    return h, 1.0 - h * h
  if name == "relu":
    return jnp.maximum(z, 0.0), (z > 0).astype(z.dtype)
  raise ValueError(f"mlp_kernel: activation {name!r}; allowed: relu, sigmoid, tanh")


def _kernel(images_ref, labels_ref, idx_ref, w1_ref, b1_ref, w2_ref, b2_ref,
            loss_ref, dw1_ref, db1_ref, dw2_ref, db2_ref, *, activation: str):
  pl, plt = _pallas()
  m, = idx_ref.shape
  d, hidden = w1_ref.shape
  classes = w2_ref.shape[1]
  mp, hp, cp = _padded(m), _padded(hidden), _padded(classes)
  rows, h_cols, c_cols = jnp.arange(mp), jnp.arange(hp), jnp.arange(cp)
  row_ok, h_ok, c_ok = rows < m, h_cols < hidden, c_cols < classes
  idx = plt.load(idx_ref.at[rows], mask=row_ok, other=0)

  def chunk_cols(k):
    cols = k * CHUNK + jnp.arange(CHUNK)
    return cols, cols < d

  def minibatch(k):  # [mp, CHUNK] of the gathered rows, as XLA's x / 255.0
    cols, ok = chunk_cols(k)
    x = plt.load(images_ref.at[idx[:, None], cols[None, :]],
                 mask=row_ok[:, None] & ok[None, :], other=0)
    return x.astype(jnp.float32) / 255.0

  def first_layer(k, acc):
    cols, ok = chunk_cols(k)
    w = plt.load(w1_ref.at[cols[:, None], h_cols[None, :]],
                 mask=ok[:, None] & h_ok[None, :], other=0.0)
    return acc + jnp.dot(minibatch(k), w)

  chunks = -(-d // CHUNK)
  z = jax.lax.fori_loop(0, chunks, first_layer, jnp.zeros((mp, hp), jnp.float32))
  z = z + plt.load(b1_ref.at[h_cols], mask=h_ok, other=0.0)[None, :]
  h, dact = _activation(activation, z)
  h = jnp.where(h_ok[None, :], h, 0.0)
  w2 = plt.load(w2_ref.at[h_cols[:, None], c_cols[None, :]],
                mask=h_ok[:, None] & c_ok[None, :], other=0.0)
  logits = jnp.dot(h, w2) + plt.load(b2_ref.at[c_cols], mask=c_ok, other=0.0)[None, :]
  logits = jnp.where(c_ok[None, :], logits, -1e30)
  top = jnp.max(logits, axis=1)
  e = jnp.exp(logits - top[:, None])
  total = jnp.sum(e, axis=1)
  labels = plt.load(labels_ref.at[idx], mask=row_ok, other=-1)
  one_hot = (c_cols[None, :] == labels[:, None]).astype(jnp.float32)
  nll = top + jnp.log(total) - jnp.sum(one_hot * logits, axis=1)
  loss_ref[...] = jnp.sum(jnp.where(row_ok, nll, 0.0)) / m

  d_logits = jnp.where(row_ok[:, None] & c_ok[None, :],
                       (e / total[:, None] - one_hot) / m, 0.0)
  plt.store(dw2_ref.at[h_cols[:, None], c_cols[None, :]],
            jax.lax.dot_general(h, d_logits, (((0,), (0,)), ((), ()))),
            mask=h_ok[:, None] & c_ok[None, :])
  plt.store(db2_ref.at[c_cols], jnp.sum(d_logits, axis=0), mask=c_ok)
  dh = jax.lax.dot_general(d_logits, w2, (((1,), (1,)), ((), ())))
  dz = jnp.where(h_ok[None, :], dh * dact, 0.0)
  plt.store(db1_ref.at[h_cols], jnp.sum(dz, axis=0), mask=h_ok)

  def weight_gradient(k, carry):
    cols, ok = chunk_cols(k)
    dw = jax.lax.dot_general(minibatch(k), dz, (((0,), (0,)), ((), ())))
    plt.store(dw1_ref.at[cols[:, None], h_cols[None, :]], dw,
              mask=ok[:, None] & h_ok[None, :])
    return carry

  jax.lax.fori_loop(0, chunks, weight_gradient, 0)


def value_and_grad(images: chex.Array, labels: chex.Array, idx: chex.Array, w1: chex.Array,
                   b1: chex.Array, w2: chex.Array, b2: chex.Array, activation: str,
                   interpret: bool = False) -> Tuple[chex.Array, Tuple[chex.Array, ...]]:
  """(mean cross-entropy of the rows ``idx`` of ``images``/``labels``, its gradient
  (dw1, db1, dw2, db2)) of the MLP softmax(act(x / 255 @ w1 + b1) @ w2 + b2).

  ``images``: [N, D] uint8 (or any dtype, divided by 255 like the MLP
  optimizee's), ``labels``: [N] integers, ``idx``: [M] row indices. The
  whole table stays in device memory; the kernel reads only the M rows.
  ``interpret``: run the program on the current backend instead of compiling
  it for a GPU (tests).
  """
  pl, plt = _pallas()
  if images.ndim != 2 or labels.shape != images.shape[:1] or idx.ndim != 1:
    raise ValueError(f"mlp_kernel.value_and_grad: images [N, D], labels [N], idx [M]; got "
                     f"{images.shape}, {labels.shape}, {idx.shape}")
  if w1.shape != (images.shape[1], b1.shape[0]) or w2.shape != (b1.shape[0], b2.shape[0]):
    raise ValueError(f"mlp_kernel.value_and_grad: w1 {w1.shape}, b1 {b1.shape}, w2 "
                     f"{w2.shape}, b2 {b2.shape} do not chain from {images.shape[1]} inputs")
  f32 = jnp.float32
  out_shape = [jax.ShapeDtypeStruct((), f32)] + [jax.ShapeDtypeStruct(a.shape, f32)
                                                 for a in (w1, b1, w2, b2)]
  loss, *grads = pl.pallas_call(
      functools.partial(_kernel, activation=activation), out_shape=out_shape,
      compiler_params=plt.CompilerParams(num_warps=NUM_WARPS * max(1, _padded(idx.shape[0]) // 128),
                                         num_stages=1),
      interpret=interpret, name="mlp_value_and_grad",
  )(images, labels.astype(jnp.int32), idx.astype(jnp.int32), *(a.astype(f32)
                                                               for a in (w1, b1, w2, b2)))
  return loss, tuple(grads)
