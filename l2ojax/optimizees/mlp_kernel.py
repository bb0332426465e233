"""Fused GPU kernels (Pallas, Triton backend): the loss and gradient of a
one-hidden-layer softmax MLP on a minibatch gathered from an image table.

XLA compiles ``jax.value_and_grad`` of the MNIST MLP's loss to ~13 kernels
(a split-K product and its reduction per dense layer, pads, the softmax,
each weight's gradient product, the bias sums), each a few microseconds of
launch latency on a GPU, for a few MFLOP of work: at one optimizee per
meta-batch they are half the kernels of an L2O-DM optimizee step. Here two
kernels and one sum do it, each program gathering its minibatch rows from the
uint8 table itself:

1. ``mlp_hidden_products``: program k forms x[:, cols_k] @ w1[cols_k] for its
   ``CHUNKS_PER_PROGRAM`` chunks of ``CHUNK`` input columns;
2. XLA sums the programs' products (the hidden layer's pre-activation);
3. ``mlp_value_and_grad``: every program does the softmax cross-entropy and
   the backward pass to the hidden layer in registers (a few KFLOP, cheaper
   than waiting for one program to share it), program 0 writes the loss and
   the small gradients, and program k the first layer's weight gradient of
   its columns, reading its rows' chunks again.

One program per optimizee looping over all 13 chunks of MNIST's 784 columns
twice (the first version) took 41 us per step on an H100, each chunk's
gather waiting on the one before: split over the columns, a program waits on
``CHUNKS_PER_PROGRAM`` of them.

Products are TF32 like XLA's default for float32 on GPUs; sizes are padded
inside the kernels to powers of two >= 16 (Triton's product tiles) with
masked loads, and the padded lanes contribute exactly zero.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp

from l2ojax import gpu

# Input columns per chunk of the first layer's products, chunks per program,
# warps per program, and software-pipeline stages of the chunk loops (with more
# than one chunk per program the next chunks' rows are fetched asynchronously,
# cp.async, while one is multiplied). On an H100 (BENCHMARKS.md) the two kernels
# take 7.3 + 3.5 us per step for one optimizee (the one-program kernel: 41 us).
CHUNK = 64
CHUNKS_PER_PROGRAM = 1
NUM_WARPS = 4
NUM_STAGES = 3
# A program holds [rows, CHUNK] of the minibatch and [rows, hidden] and
# [rows, classes] tiles in registers: larger ones would spill. (ptxas, sm_90a,
# 784-20-10: no spills up to 256 rows; at 512 mlp_value_and_grad keeps 176
# bytes per thread on the stack.)
MAX_ROWS = 512
MAX_WIDTH = 128


_padded = gpu.padded


def _pallas():
  return gpu.pallas_triton("mlp_kernel: the fused MLP kernel", "kernel='xla'")


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


PARAMS = ("w1", "b1", "w2", "b2")


class Layout(NamedTuple):
  """Where the MLP's parameters lie in the 1-D pieces the kernel reads: per
  parameter of ``PARAMS`` (w1 [inputs, hidden], b1, w2 [hidden, classes], b2,
  each row-major) its piece and offset there; and where it writes their
  gradient, always one vector in ``ravel_pytree``'s order (what a learned
  optimizer reads; a leafwise optimizer's kernels read its slices)."""
  inputs: int
  hidden: int
  classes: int
  where: Tuple[Tuple[int, int], ...]  # per parameter: (piece, offset)
  sizes: Tuple[int, ...]              # per piece
  flat_offsets: Tuple[int, ...]       # per parameter: its offset in the gradient vector


def _mlp_leaves(params: dict) -> Tuple[chex.Array, ...]:
  """(w1, b1, w2, b2) of a one-hidden-layer MLP's params, checked."""
  try:
    w1, b1 = params["layer_0"]["w"], params["layer_0"]["b"]
    w2, b2 = params["layer_1"]["w"], params["layer_1"]["b"]
    ok = (sorted(params) == ["layer_0", "layer_1"] and w1.ndim == 2 and w2.ndim == 2
          and w2.shape[0] == w1.shape[1] and b1.shape == (w1.shape[1],)
          and b2.shape == (w2.shape[1],))
  except (KeyError, TypeError, AttributeError):
    ok = False
  if not ok:
    shapes = jax.tree_util.tree_map(jnp.shape, params)
    raise ValueError("mlp_kernel: expected a one-hidden-layer MLP's params "
                     f"{{layer_0, layer_1: {{w, b}}}}, got {shapes}")
  return w1, b1, w2, b2


def layout(params: dict, flat: bool) -> Layout:
  """The ``Layout`` of a one-hidden-layer MLP's ``{"layer_0": {"w", "b"}, "layer_1":
  {"w", "b"}}``: with ``flat``, the one vector ``jax.flatten_util.ravel_pytree(params)``;
  else the four leaves, each raveled (``pieces``)."""
  w1, b1, w2, b2 = _mlp_leaves(params)
  offsets, at = {}, 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    offsets[jax.tree_util.keystr(path)] = at
    at += leaf.size
  names = (("layer_0", "w"), ("layer_0", "b"), ("layer_1", "w"), ("layer_1", "b"))
  flat_offsets = tuple(offsets[f"['{l}']['{n}']"] for l, n in names)
  if flat:
    return Layout(w1.shape[0], w1.shape[1], w2.shape[1], tuple((0, o) for o in flat_offsets),
                  (at,), flat_offsets)
  return Layout(w1.shape[0], w1.shape[1], w2.shape[1], tuple((i, 0) for i in range(4)),
                tuple(a.size for a in (w1, b1, w2, b2)), flat_offsets)


def pieces(params: dict) -> Tuple[chex.Array, ...]:
  """The four leaves (w1, b1, w2, b2) raveled: what the kernel reads with
  ``layout(params, flat=False)`` (a reshape, no copy)."""
  return tuple(a.reshape(-1) for a in _mlp_leaves(params))


def _common(idx_ref, images_ref, at: Layout):
  """The row and column indices both kernels use, and their minibatch loader."""
  pl, plt = _pallas()
  m, = idx_ref.shape
  mp, hp, cp = _padded(m), _padded(at.hidden), _padded(at.classes)
  rows, h_cols, c_cols = jnp.arange(mp), jnp.arange(hp), jnp.arange(cp)
  row_ok = rows < m
  idx = plt.load(idx_ref.at[rows], mask=row_ok, other=0)

  def chunk_cols(k):
    cols = k * CHUNK + jnp.arange(CHUNK)
    return cols, cols < at.inputs

  def minibatch(k):  # [mp, CHUNK] of the gathered rows, as XLA's x / 255.0
    cols, ok = chunk_cols(k)
    x = plt.load(images_ref.at[idx[:, None], cols[None, :]],
                 mask=row_ok[:, None] & ok[None, :], other=0)
    return x.astype(jnp.float32) / 255.0

  return m, idx, (rows, h_cols, c_cols), row_ok, chunk_cols, minibatch


def _loader(param_refs, at: Layout):
  _, plt = _pallas()

  def load(name, index, mask):
    piece, offset = at.where[PARAMS.index(name)]
    # the offsets as the index computes them (the mask alone keeps other lanes out: an
    # interpreted load reads them, in bounds or not, and drops them): where they run
    # along a tile's lanes, the compiler loads several at a time; mapped elsewhere, one
    return plt.load(param_refs[piece].at[offset + index], mask=mask, other=0.0)

  return load


def _w1_index(cols, h_cols, hidden):
  return cols[:, None] * hidden + h_cols[None, :]


def _hidden_kernel(images_ref, idx_ref, *refs, at: Layout):
  # refs: the parameters' pieces | this program's share of the first layer's product
  param_refs, z_ref = refs[:-1], refs[-1]
  pl, plt = _pallas()
  program = pl.program_id(0)
  _, _, (rows, h_cols, _), _, chunk_cols, minibatch = _common(idx_ref, images_ref, at)
  load = _loader(param_refs, at)
  h_ok = h_cols < at.hidden

  def first_layer(j, acc):
    k = program * CHUNKS_PER_PROGRAM + j
    cols, ok = chunk_cols(k)
    w = load("w1", _w1_index(cols, h_cols, at.hidden), ok[:, None] & h_ok[None, :])
    return acc + jnp.dot(minibatch(k), w)

  z = jax.lax.fori_loop(0, CHUNKS_PER_PROGRAM, first_layer,
                        jnp.zeros((rows.size, h_cols.size), jnp.float32))
  plt.store(z_ref.at[program, rows[:, None], h_cols[None, :]], z)


def _output_kernel(images_ref, labels_ref, idx_ref, z_ref, *refs, at: Layout, activation: str):
  # refs: the parameters' pieces | the loss, the gradient (one vector)
  num = len(at.sizes)
  param_refs, (loss_ref, grad_ref) = refs[:num], refs[num:]
  grad_size = sum(at.sizes)
  pl, plt = _pallas()
  program = pl.program_id(0)
  m, idx, (rows, h_cols, c_cols), row_ok, chunk_cols, minibatch = _common(
      idx_ref, images_ref, at)
  load = _loader(param_refs, at)
  hidden, classes = at.hidden, at.classes
  h_ok, c_ok = h_cols < hidden, c_cols < classes

  def store(name, index, mask, value):
    where = jnp.where(mask, at.flat_offsets[PARAMS.index(name)] + index, grad_size)
    plt.store(grad_ref.at[where], value, mask=mask)

  w2_index = h_cols[:, None] * classes + c_cols[None, :]
  w2_ok = h_ok[:, None] & c_ok[None, :]
  # every program recomputes the (small) softmax and backward to the hidden
  # layer rather than waiting on one that would
  z = plt.load(z_ref.at[rows[:, None], h_cols[None, :]]) + load("b1", h_cols, h_ok)[None, :]
  h, dact = _activation(activation, z)
  h = jnp.where(h_ok[None, :], h, 0.0)
  w2 = load("w2", w2_index, w2_ok)
  logits = jnp.dot(h, w2) + load("b2", c_cols, c_ok)[None, :]
  logits = jnp.where(c_ok[None, :], logits, -1e30)
  top = jnp.max(logits, axis=1)
  e = jnp.exp(logits - top[:, None])
  total = jnp.sum(e, axis=1)
  labels = plt.load(labels_ref.at[idx], mask=row_ok, other=-1)
  one_hot = (c_cols[None, :] == labels[:, None]).astype(jnp.float32)
  d_logits = jnp.where(row_ok[:, None] & c_ok[None, :],
                       (e / total[:, None] - one_hot) / m, 0.0)
  dh = jax.lax.dot_general(d_logits, w2, (((1,), (1,)), ((), ())))
  dz = jnp.where(h_ok[None, :], dh * dact, 0.0)

  @pl.when(program == 0)
  def _():
    nll = top + jnp.log(total) - jnp.sum(one_hot * logits, axis=1)
    loss_ref[...] = jnp.sum(jnp.where(row_ok, nll, 0.0)) / m
    store("w2", w2_index, w2_ok, jax.lax.dot_general(h, d_logits, (((0,), (0,)), ((), ()))))
    store("b2", c_cols, c_ok, jnp.sum(d_logits, axis=0))
    store("b1", h_cols, h_ok, jnp.sum(dz, axis=0))

  def weight_gradient(j, carry):
    k = program * CHUNKS_PER_PROGRAM + j
    cols, ok = chunk_cols(k)
    dw = jax.lax.dot_general(minibatch(k), dz, (((0,), (0,)), ((), ())))
    store("w1", _w1_index(cols, h_cols, hidden), ok[:, None] & h_ok[None, :], dw)
    return carry

  jax.lax.fori_loop(0, CHUNKS_PER_PROGRAM, weight_gradient, 0)


def value_and_grad(images: chex.Array, labels: chex.Array, idx: chex.Array,
                   params: Sequence[chex.Array], at: Layout, activation: str,
                   interpret: bool = False) -> Tuple[chex.Array, chex.Array]:
  """(mean cross-entropy of the rows ``idx`` of ``images``/``labels``, its gradient) of
  the MLP softmax(act(x / 255 @ w1 + b1) @ w2 + b2) whose parameters are the 1-D
  arrays ``params`` laid out as ``at`` says (``layout``); the gradient as one
  vector, raveled as ``jax.flatten_util.ravel_pytree`` ravels the params.

  ``images``: [N, D] uint8 (or any dtype, divided by 255 like the MLP
  optimizee's), ``labels``: [N] integers, ``idx``: [M] row indices. The
  whole table stays in device memory; the kernels read only the M rows.
  ``params`` is one vector where an unroll carries the parameters flat (XLA
  then passes the carry itself: slicing it into leaves would be a kernel per
  leaf), else the leaves, raveled (concatenating them would be a kernel).
  ``interpret``: run the program on the current backend instead of compiling
  it for a GPU (tests).
  """
  pl, plt = _pallas()
  if images.ndim != 2 or labels.shape != images.shape[:1] or idx.ndim != 1:
    raise ValueError(f"mlp_kernel.value_and_grad: images [N, D], labels [N], idx [M]; got "
                     f"{images.shape}, {labels.shape}, {idx.shape}")
  if images.shape[1] != at.inputs or tuple(jnp.shape(p) for p in params) != tuple(
      (n,) for n in at.sizes):
    raise ValueError(f"mlp_kernel.value_and_grad: parameters "
                     f"{[jnp.shape(p) for p in params]} laid out as {at} do not fit "
                     f"{images.shape[1]} inputs")
  f32 = jnp.float32
  m = idx.shape[0]
  programs = -(-at.inputs // (CHUNK * CHUNKS_PER_PROGRAM))
  warps = NUM_WARPS * max(1, _padded(m) // 128)
  idx, params = idx.astype(jnp.int32), tuple(p.astype(f32) for p in params)
  z_parts = pl.pallas_call(
      functools.partial(_hidden_kernel, at=at),
      out_shape=jax.ShapeDtypeStruct((programs, _padded(m), _padded(at.hidden)), f32),
      grid=(programs,),
      compiler_params=plt.CompilerParams(num_warps=warps, num_stages=NUM_STAGES),
      interpret=interpret, name="mlp_hidden_products",
  )(images, idx, *params)
  loss, grad = pl.pallas_call(
      functools.partial(_output_kernel, at=at, activation=activation),
      out_shape=[jax.ShapeDtypeStruct((), f32), jax.ShapeDtypeStruct((sum(at.sizes),), f32)],
      grid=(programs,),
      compiler_params=plt.CompilerParams(num_warps=warps, num_stages=NUM_STAGES),
      interpret=interpret, name="mlp_value_and_grad",
  )(images, labels.astype(jnp.int32), idx, jnp.sum(z_parts, axis=0), *params)
  return loss, grad
