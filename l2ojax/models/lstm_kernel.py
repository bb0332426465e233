"""Fused GPU kernels (Pallas, Triton backend) for the passes of an LSTM stack.

``cells.lstm_stack_apply`` as XLA compiles it writes each layer's gate
pre-activations [rows, 4 x hidden] to memory and reads them back (a GEMM's
output cannot be fused with the cell's mixing of its four gate blocks), plus a
concatenation of [x, h] per layer: at hidden 20 that is ~340 floats moved per
row and layer for ~100 that the cell needs. ``stack_forward`` reads each
row's x, h and c once, keeps the gates in registers, and writes only the new
h and c and the read-out: one launch per step for the whole stack.

Its backward pass as XLA compiles it is worse (~1,800 floats per row and
step: each gate's tanh read by three kernels, the gate cotangents written
and read twice, [x, h, 1] rebuilt). ``stack_backward`` reads a row's saved
inputs [x, h's, c's] and the cotangents once, recomputes the gates, and
writes the cotangents of x, h and c and, for the weights' gradient, each
layer's gate cotangents and output. ``weights_gradient`` forms that gradient
from them ([x, h, 1]^T dz per layer, the read-out's): each program owns a
contiguous share of the rows and writes its partial sum once (the
``gradient_chunks`` of ``cells.LSTMStack``), so no atomics and the same sums
on every run, and reads its operands where they lie (XLA's split-K products
padded copies of both).

Both compute what ``cells._stack_core`` and its gradient compute, with TF32
matrix products like XLA's default for float32 on GPUs. Hidden and input
sizes are padded to powers of two >= 16 inside the kernels (Triton's
matrix-product tiles) by zero weight rows and columns, which leave the padded
lanes at exactly zero.

jax 0.11 deprecates Pallas's Triton backend (a warning when a kernel is
lowered; it is to be removed for Mosaic GPU): these kernels are opt-in, and
XLA's ops remain the default path on every backend.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from l2ojax import gpu
from l2ojax.models import preprocess

# Rows per block, warps per program, blocks per program (in a loop) and software-
# pipeline stages of that loop (read when a program is traced). More than one block
# and stage fetch the next block's state while one is computed (cp.async in the
# PTX). ptxas (sm_90a), L2O-DM / RNNProp, no spills in any: 166 / 166 registers as
# here (no loop; B = 1), 240 / 255 at 2 blocks and 2 stages, 192 / 198 at 4 and 3
# (measured before the gates' products were taken in turn). Timed on
# an H100 (BENCHMARKS.md), 4 blocks and 3 stages made the kernel 1.9x slower at
# B = 64: one block, no pipelining.
BLOCK_ROWS = 64  # at 128 the variant writing the gates spills registers (ptxas, sm_90a)
NUM_WARPS = 4
BLOCKS_PER_PROGRAM = 1
NUM_STAGES = 1

# Programs per multiprocessor of the forward kernel, or 0 (default): one program per
# block. Each program copies the weights (~50 KB for L2O-DM, TF32-rounded into its
# products' layout: a fifth of a one-block program's SASS instructions, and at B = 64
# ~830 MB of L2 traffic per step) for a single block of 64 rows. With k > 0, at
# most k x (multiprocessors) programs read the weights once each and take every P-th
# block in a loop, and under ``vmap`` (weights shared) the optimizees' rows are folded
# into one array of rows (``_rows_folded``; with a residual tape, each optimizee's saved
# inputs still go to its own tape), so that the loop spans them all rather than one
# optimizee's 249 blocks. Where a single round of programs covers the rows, the
# one-block kernel runs as before. An int (the benchmark's --kernel_constant); not yet
# timed. ptxas (sm_90a), L2O-DM: 161 registers (3 programs of 4 warps fit a multiprocessor
# at <= 168), 160 with EXP2_TANH, 168 with EXP2_TANH and a bfloat16 state; RNNProp (its
# input beside h, not packed): 188, and with the residual tape 187-210: 2 for those.
FORWARD_PROGRAMS_PER_CORE = 0
# Multiprocessors assumed where the default backend is not a GPU (interpreted kernels,
# programs compiled for a GPU from the CPU): an H100's or H200's.
CORES_OFF_GPU = 132


# Whether the kernels take tanh from the GPU's approximate instruction (tanh.approx.f32:
# one MUFU operation, relative error about 2^-11) instead of the accurate sequence (two
# MUFU operations and a dozen others per tanh). An int, so that the benchmark's
# --kernel_constant sets it; interpreted kernels keep jnp.tanh. Not yet timed.
APPROX_TANH = 0
# Whether they take it as 1 - 2 / (1 + 2^(2 log2(e) z)) from ex2.approx and rcp.approx
# instead, and each sigmoid gate as 1 / (1 + 2^(-2 log2(e) z)): the same two MUFU
# operations as the accurate sequence but a few others, not its range checks and selects
# (SASS: 43% fewer instructions per row in the forward kernel, a third in the backward);
# an absolute error below 5e-7 (the accurate one's ~1.2e-7; tanh.approx's up to ~5e-4).
# Interpreted kernels evaluate the same formulas with jnp's exp2 and division. Not yet
# timed.
EXP2_TANH = 0

# r = 1 / (1 + 2^(2 log2(e) z)) (2 log2(e) = 0x4038AA3B, 1 = 0x3F800000); flushing to zero
# only takes 2^u < 2^-126, where 1 + 2^u rounds to 1 anyway, and 2^u = inf gives r = 0.
# tanh = 1 - 2 r outside the assembly: with that FMA inside it, ptxas gave the forward
# kernel 182 registers rather than 166 (two programs per multiprocessor, not three).
_EXP2_TANH_PTX = ("{ .reg .f32 e; mul.f32 e, $1, 0f4038AA3B; ex2.approx.ftz.f32 e, e; "
                  "add.f32 e, e, 0f3F800000; rcp.approx.ftz.f32 $0, e; }")


def exp2_tanh(z: jax.Array) -> jax.Array:
  """tanh(z) as 1 - 2 / (1 + 2^(2 log2(e) z)), evaluated by jnp (what ``EXP2_TANH``'s
  interpreted kernels use, and the formula its PTX evaluates)."""
  return 1.0 - 2.0 / (1.0 + jnp.exp2(jnp.float32(2.0 * math.log2(math.e)) * z))


def _exp2_tanh_ptx(z: jax.Array) -> jax.Array:
  return 1.0 - 2.0 * _exp2_ptx(_EXP2_TANH_PTX, z)


# s = 1 / (1 + 2^(-2 log2(e) z)) = sigmoid(2 z) = (1 + tanh(z)) / 2, a sigmoid gate of its
# pre-scaled pre-activation z (-2 log2(e) = 0xC038AA3B): no 1 - 2 r and (1 + t) / 2 after
_EXP2_GATE_PTX = ("{ .reg .f32 e; mul.f32 e, $1, 0fC038AA3B; ex2.approx.ftz.f32 e, e; "
                  "add.f32 e, e, 0f3F800000; rcp.approx.ftz.f32 $0, e; }")


def exp2_gate(z: jax.Array) -> jax.Array:
  """(1 + tanh(z)) / 2 as 1 / (1 + 2^(-2 log2(e) z)), evaluated by jnp (``EXP2_TANH``'s
  interpreted sigmoid gates)."""
  return 1.0 / (1.0 + jnp.exp2(jnp.float32(-2.0 * math.log2(math.e)) * z))


def _exp2_ptx(text: str, z: jax.Array) -> jax.Array:
  inline_asm = getattr(_pallas()[1], "elementwise_inline_asm", None)
  if inline_asm is None:
    raise ImportError(f"lstm_kernel.EXP2_TANH: jax {jax.__version__}'s Pallas Triton "
                      "backend has no elementwise_inline_asm; set lstm_kernel.EXP2_TANH = 0")
  [r] = inline_asm(text, args=[z], constraints="=f,f", pack=1,
                   result_shape_dtypes=[jax.ShapeDtypeStruct(z.shape, jnp.float32)])
  return r


def _gate(interpret: bool):
  """The kernels' sigmoid gate of a pre-scaled pre-activation z, (1 + tanh(z)) / 2: with
  ``EXP2_TANH`` in one reciprocal, else from ``_tanh``'s."""
  if EXP2_TANH and not APPROX_TANH:
    return exp2_gate if interpret else functools.partial(_exp2_ptx, _EXP2_GATE_PTX)
  tanh = _tanh(interpret)
  return lambda z: 0.5 * tanh(z) + 0.5


def _tanh(interpret: bool):
  """The kernels' tanh: ``APPROX_TANH``'s or ``EXP2_TANH``'s on a GPU, else jnp.tanh
  (``exp2_tanh`` interpreted with ``EXP2_TANH``)."""
  if APPROX_TANH and EXP2_TANH:
    raise ValueError("lstm_kernel: APPROX_TANH and EXP2_TANH are both set; set one")
  if EXP2_TANH:
    return exp2_tanh if interpret else _exp2_tanh_ptx
  if not APPROX_TANH or interpret:
    return jnp.tanh
  approx = getattr(_pallas()[1], "approx_tanh", None)
  if approx is None:
    raise ImportError(f"lstm_kernel.APPROX_TANH: jax {jax.__version__}'s Pallas Triton "
                      "backend has no approx_tanh; set lstm_kernel.APPROX_TANH = 0")
  return approx


_padded = gpu.padded


def _pallas():
  return gpu.pallas_triton("lstm_kernel: the fused LSTM kernels", "lstm_kernel='xla'")


def packs_input(n_in: int, hidden: int) -> bool:
  """Whether the first layer's input fits in the padding lanes of its h: then the
  kernels multiply one tile [h, x, 0] (``pad_stack``'s first ``wh``) instead of
  a padded x and a padded h, and get x's cotangent from h's product. L2O-DM's
  2 inputs beside 20 units of 32 lanes: a third fewer products in that layer.
  """
  return n_in + hidden <= _padded(hidden)


class PaddedStack(NamedTuple):
  """Pre-scaled stack weights split per gate and zero-padded for the kernel."""
  wx: Tuple[chex.Array, ...]  # per layer [4, padded input, padded hidden]
  # per layer [4, padded hidden, padded hidden]; where ``packs_input``, the first
  # layer's x rows follow its h rows (its wx is then not read)
  wh: Tuple[chex.Array, ...]
  b: Tuple[chex.Array, ...]   # per layer [4, padded hidden]
  w_out: chex.Array           # [padded last hidden, padded n_out]
  b_out: chex.Array           # [padded n_out]


def pad_stack(ws: Sequence[chex.Array], bs: Sequence[chex.Array], w_out: chex.Array,
              b_out: chex.Array, input_size: int) -> PaddedStack:
  """``PaddedStack`` of pre-scaled ``ws`` [in + hidden, 4 hidden], ``bs`` [4 hidden]."""
  wx, wh, b = [], [], []
  n_in = input_size
  for w, bias in zip(ws, bs):
    hidden = w.shape[1] // 4
    hp, xp = _padded(hidden), _padded(n_in)
    gates = w.reshape(w.shape[0], 4, hidden).transpose(1, 0, 2)  # [4, in + hidden, hidden]
    wx.append(jnp.pad(gates[:, :n_in], ((0, 0), (0, xp - n_in), (0, hp - hidden))))
    h_rows = gates[:, n_in:]
    if not wh and packs_input(n_in, hidden):
      h_rows = jnp.concatenate([h_rows, gates[:, :n_in]], axis=1)
    wh.append(jnp.pad(h_rows, ((0, 0), (0, hp - h_rows.shape[1]), (0, hp - hidden))))
    b.append(jnp.pad(bias.reshape(4, hidden), ((0, 0), (0, hp - hidden))))
    n_in = hidden
  n_out = w_out.shape[1]
  w_out = jnp.pad(w_out, ((0, _padded(n_in) - n_in), (0, _padded(n_out) - n_out)))
  return PaddedStack(tuple(wx), tuple(wh), tuple(b), w_out,
                     jnp.pad(b_out, (0, _padded(n_out) - n_out)))


def _kernel(*refs, num_layers: int, sizes: Tuple[int, ...], n_in: int, n_out: int,
            with_gates: bool, log_and_sign_k: Optional[float], tanh, gate,
            taped: bool = False, o_first: bool = False, stride: Optional[Tuple[int, int]] = None,
            tape_rows: Optional[Tuple[int, int]] = None):
  # tanh, gate: ``_tanh``'s and ``_gate``'s (a gate of its pre-scaled pre-activation);
  # o_first: the order of the gates' products (registers, below); stride: (programs,
  # blocks per program): the weights read once, then blocks program, program + programs, ...
  # (``FORWARD_PROGRAMS_PER_CORE``); tape_rows: (rows, tape rows) per optimizee where the
  # rows are several optimizees' folded together (``_rows_folded``), each with its tape
  # refs: x, h_0.., c_0.., wx_0.., wh_0.., b_0.., w_out, b_out [, slot, tape]
  #       | out, h'_0.., c'_0.. [, t_0..] [, tape']
  x_ref, refs = refs[0], refs[1:]
  h_refs, c_refs = refs[:num_layers], refs[num_layers:2 * num_layers]
  wx_refs = refs[2 * num_layers:3 * num_layers]
  wh_refs = refs[3 * num_layers:4 * num_layers]
  b_refs = refs[4 * num_layers:5 * num_layers]
  w_out_ref, b_out_ref = refs[5 * num_layers:5 * num_layers + 2]
  refs = refs[5 * num_layers + 2:]
  slot_ref, refs = (refs[0], refs[2:]) if taped else (None, refs)  # the tape in: aliased
  out_ref, refs = refs[0], refs[1:]
  h_out_refs, c_out_refs = refs[:num_layers], refs[num_layers:2 * num_layers]
  t_refs = refs[2 * num_layers:2 * num_layers + (num_layers if with_gates else 0)]
  tape_ref = refs[-1] if taped else None
  pl, plt = _pallas()

  n = x_ref.shape[0]
  program = pl.program_id(0)
  if stride is None:  # each weight read where a product uses it
    wx = lambda l, g: wx_refs[l][g]
    wh = lambda l, g: wh_refs[l][g]
    bias = lambda l, g: b_refs[l][g]
    w_out, b_out = lambda: w_out_ref[...], lambda: b_out_ref[...]
    first, step, blocks = program * BLOCKS_PER_PROGRAM, 1, BLOCKS_PER_PROGRAM
  else:  # read once, before the loop (the loop's invariants)
    packed_first = packs_input(n_in, sizes[0])
    wxs = [[None if (l == 0 and packed_first) else wx_refs[l][g] for g in range(4)]
           for l in range(num_layers)]
    whs = [[wh_refs[l][g] for g in range(4)] for l in range(num_layers)]
    w_out_value = w_out_ref[...]
    wx, wh, w_out = (lambda l, g: wxs[l][g]), (lambda l, g: whs[l][g]), lambda: w_out_value
    # the biases read per block: held through the loop, broadcast in the products' layout,
    # they took ~60 more registers (ptxas, sm_90a, L2O-DM: 161 -> 223, two programs per
    # multiprocessor instead of three)
    bias, b_out = lambda l, g: b_refs[l][g], lambda: b_out_ref[...]
    (first, step), blocks = (program, stride[0]), stride[1]

  def block(j, carry):
    """One block of rows (``blocks`` per program, in a loop)."""
    rows = (first + j * step) * BLOCK_ROWS + jnp.arange(BLOCK_ROWS)
    row_ok = (rows < n)[:, None]

    def load(ref, width, lanes=None, shift=0):
      """Columns [0, width) of ref's rows in lanes [shift, shift + width) of a tile."""
      cols = jnp.arange(_padded(width) if lanes is None else lanes)
      inside = (cols >= shift) & (cols < shift + width)
      mask = row_ok & inside[None, :]
      # Unshifted, the columns are the lanes: one contiguous load the compiler issues
      # several elements at a time (a gather loads one at a time). Shifted, masked lanes
      # would point before the row's first column.
      at = cols if shift == 0 else jnp.where(inside, cols - shift, 0)
      return plt.load(ref.at[rows[:, None], at[None, :]], mask=mask, other=0.0)

    def store(ref, value, width, offset=0):
      cols = jnp.arange(_padded(width))
      mask = row_ok & (cols < width)[None, :]
      plt.store(ref.at[rows[:, None], offset + cols[None, :]], value.astype(ref.dtype), mask=mask)

    if log_and_sign_k is not None:
      # x_ref is the gradient g [n]: x = preprocess.log_and_sign(g, k), computed here once
      # (a tape's x and the packed tile's are the same parts)
      g = plt.load(x_ref.at[rows], mask=rows < n, other=0.0).astype(jnp.float32)[:, None]
      log, sign = preprocess.log_and_sign_parts(g, log_and_sign_k)

    def inputs(lanes, shift=0):
      """x in lanes [shift, shift + n_in) of a [rows, lanes] tile, the rest 0."""
      if log_and_sign_k is None:
        return load(x_ref, n_in, lanes, shift).astype(jnp.float32)
      lane = jnp.arange(lanes)[None, :]
      return jnp.where(lane == shift, log, jnp.where(lane == shift + 1, sign, 0.0))

    if taped:  # this step's inputs [x, h's, c's] (cells._saved_inputs) in the tape's slot
      if tape_rows is None:
        saved_rows = slot_ref[0] * n + rows
      else:  # row r of optimizee k: row r of the slot in k's tape
        m, per = tape_rows
        saved_rows = (rows // m) * per + slot_ref[0] * m + rows % m
      split_x = _saved_layout(tape_ref, sizes)[1]
      x_width = tape_ref.shape[-1] - 2 * sum(sizes)

      def keep(value, width, offset):
        cols = jnp.arange(value.shape[1])
        plt.store(tape_ref.at[saved_rows[:, None], offset + cols[None, :]],
                  value.astype(tape_ref.dtype), mask=row_ok & (cols < width)[None, :])

      x_saved = inputs(_padded(n_in))
      keep(x_saved, n_in, 0)
      if split_x:  # [hi, lo], hi + lo = x
        hi = x_saved.astype(tape_ref.dtype).astype(jnp.float32)
        keep(x_saved - hi, n_in, n_in)

    packed = packs_input(n_in, sizes[0])
    x = None if packed else inputs(_padded(n_in))
    for l, hidden in enumerate(sizes):
      h = load(h_refs[l], hidden).astype(jnp.float32)
      c = load(c_refs[l], hidden).astype(jnp.float32)
      if taped:
        keep(h, hidden, x_width + sum(sizes[:l]))
        keep(c, hidden, x_width + sum(sizes) + sum(sizes[:l]))
      if l == 0 and packed:  # [h, x, 0] in one tile
        h = h + inputs(_padded(hidden), hidden)
      # gates i, j, f, o of pre-scaled weights: j = tanh(z), the others (1 + tanh(z)) / 2
      def pre(g):  # gate g's pre-activation
        return ((jnp.dot(h, wh(l, g)) if x is None
                 else jnp.dot(x, wx(l, g)) + jnp.dot(h, wh(l, g)))
                + bias(l, g)[None, :])

      # each gate's products just before its use, fewer [rows, lanes] tiles live at once:
      # f, then i and j, then o; with EXP2_TANH o first. ptxas (sm_90a) then keeps the
      # kernel at <= 168 registers (three 4-warp programs per multiprocessor) in every
      # configuration BENCHMARKS.md lists, where all four products at once took 171-174
      # in nine of them (two programs)
      a = [None] * 4
      if o_first:
        a[3] = gate(pre(3))
      a[2] = gate(pre(2))
      c = a[2] * c
      a[0], a[1] = gate(pre(0)), tanh(pre(1))
      c = c + a[0] * a[1]
      if not o_first:
        a[3] = gate(pre(3))
      x = a[3] * tanh(c)
      store(h_out_refs[l], x, hidden)
      store(c_out_refs[l], c, hidden)
      if with_gates:  # the gates' tanh, what the backward pass keeps (cells._stack_core_fwd)
        for g in range(4):
          store(t_refs[l], a[g] if g == 1 else 2.0 * a[g] - 1.0, hidden, offset=g * hidden)
    store(out_ref, jnp.dot(x, w_out()) + b_out()[None, :], n_out)

    return carry

  jax.lax.fori_loop(0, blocks, block, 0)


def stack_forward(padded: PaddedStack, x: chex.Array, hs: Sequence[chex.Array],
                  cs: Sequence[chex.Array], n_out: int, interpret: bool = False,
                  with_gates: bool = False, log_and_sign_k: Optional[float] = None,
                  tape: Optional[chex.Array] = None, slot: Optional[chex.Array] = None
                  ) -> Tuple[chex.Array, ...]:
  """(read-out [n, n_out], new h's, new c's) of the stack on rows ``x`` [n, n_in].

  ``log_and_sign_k``: ``x`` is a gradient [n] and the stack's input is
  ``preprocess.log_and_sign(x, k)`` [n, 2], computed in the kernel (one
  launch per step fewer than preprocessing before it).

  ``hs``, ``cs``: per layer [n, hidden], float32 or narrower (bfloat16); the new
  h's and c's come in their dtypes, the rest in float32 like the weights.
  ``with_gates``: also each layer's gate tanh t [n, 4 x hidden] (columns i, j,
  f, o), what ``cells._stack_core_fwd`` keeps for the backward pass.
  ``interpret``: run the kernel's program on the current backend (any platform;
  slow) instead of compiling it for a GPU.
  ``tape`` [steps x n, width], ``slot`` (int32 [1]): also write the step's inputs
  [x, h's, c's] (``cells._saved_inputs``, in the tape's dtype) to rows [slot x
  n, (slot + 1) x n) of ``tape``, in place, and return the tape last: the
  residual of a loop's step written where the backward pass reads it
  (``residuals.taped_scan``), rather than stacked by the loop after the call.
  """
  if log_and_sign_k is None:
    if x.ndim != 2:
      raise ValueError(f"lstm_kernel.stack_forward: x must be [rows, features], got {x.shape}")
    n, n_in = x.shape
  elif x.ndim == 1:
    (n,), n_in = x.shape, 2
  else:
    raise ValueError(f"lstm_kernel.stack_forward: with log_and_sign_k, x is a gradient "
                     f"[rows], got {x.shape}")
  sizes = tuple(h.shape[-1] for h in hs)
  taped = tape is not None
  if taped:
    _check_tape("stack_forward", tape, slot, n, sizes, n_in)
  call = functools.partial(_forward_call, n_out=n_out, interpret=interpret,
                           with_gates=with_gates, log_and_sign_k=log_and_sign_k)
  if FORWARD_PROGRAMS_PER_CORE:
    # with a tape, the optimizee's rows (folded with others', each keeps its own tape)
    call = _rows_folded(functools.partial(call, opt_rows=n) if taped else call)
  return call(padded, x, tuple(hs), tuple(cs), *((tape, slot) if taped else ()))


def forward_stride(n: int, cores: int) -> Optional[Tuple[int, int]]:
  """(programs, blocks per program) of the forward kernel on ``n`` rows with
  ``FORWARD_PROGRAMS_PER_CORE`` programs on each of ``cores`` multiprocessors, or
  None where one program per block is as many rounds (a round covers the rows, or
  the setting is off). As many blocks per program as rounds of programs the GPU
  would run them in, and as few programs as take them (each has a block of rows;
  the last round's blocks past the rows are masked). L2O-DM's 15,910 rows at 3 x
  132: B = 1: None, 8: (332, 6), 10: (356, 7), 64: (389, 41).
  """
  slots = FORWARD_PROGRAMS_PER_CORE * cores
  total = -(-n // BLOCK_ROWS)
  if not FORWARD_PROGRAMS_PER_CORE or total <= slots:
    return None
  per = -(-total // slots)
  return -(-total // per), per


def _cores() -> int:
  if jax.default_backend() == "gpu":
    return getattr(jax.devices()[0], "core_count", None) or CORES_OFF_GPU
  return CORES_OFF_GPU


def _forward_call(padded: PaddedStack, x: chex.Array, hs: Tuple[chex.Array, ...],
                  cs: Tuple[chex.Array, ...], tape: Optional[chex.Array] = None,
                  slot: Optional[chex.Array] = None, *, n_out: int, interpret: bool,
                  with_gates: bool, log_and_sign_k: Optional[float],
                  opt_rows: Optional[int] = None):
  """``stack_forward``'s kernel on ``x``'s rows (checked there); with a tape,
  ``opt_rows``: the rows of each optimizee whose rows (``opt_rows`` each, in order)
  and tapes (as many rows each) ``x`` and ``tape`` are, folded together."""
  pl, plt = _pallas()
  n = x.shape[0]
  n_in = 2 if log_and_sign_k is not None else x.shape[1]
  sizes = tuple(h.shape[-1] for h in hs)
  taped = tape is not None
  stride = None if BLOCKS_PER_PROGRAM != 1 else forward_stride(n, _cores())
  tape_rows = None
  if taped and opt_rows not in (None, n):
    tape_rows = (opt_rows, tape.shape[0] // (n // opt_rows))
  dtype = jnp.float32
  # h and c are read and written in their own dtype (a bfloat16 state stays narrow in
  # memory), computed on in float32
  out_shape = ([jax.ShapeDtypeStruct((n, n_out), dtype)]
               + [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (*hs, *cs)]
               + [jax.ShapeDtypeStruct((n, 4 * s), dtype) for s in sizes if with_gates]
               + ([jax.ShapeDtypeStruct(tape.shape, tape.dtype)] if taped else []))
  kernel = functools.partial(_kernel, num_layers=len(sizes), sizes=sizes, n_in=n_in,
                             n_out=n_out, with_gates=with_gates, log_and_sign_k=log_and_sign_k,
                             tanh=_tanh(interpret), gate=_gate(interpret), taped=taped,
                             o_first=bool(EXP2_TANH), stride=stride, tape_rows=tape_rows)
  num = len(sizes)
  operands = [x, *hs, *cs, *padded.wx, *padded.wh, *padded.b, padded.w_out, padded.b_out]
  # Each program reads its rows' h and c before it writes them: updating them in
  # place saves a loop carrying the state a copy of it per step. (Differentiated,
  # XLA stacks the old state for the backward pass before the call: no copy either.)
  aliases = {i: i for i in range(1, 2 * num + 1)}
  if taped:
    aliases[len(operands) + 1] = len(out_shape) - 1
    operands += [slot, tape]
  grid = stride[0] if stride else pl.cdiv(n, BLOCK_ROWS * BLOCKS_PER_PROGRAM)
  out, *new = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(grid,),
      compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
      input_output_aliases=aliases, interpret=interpret, name="lstm_stack_forward",
  )(*operands)
  gates = (tuple(new[2 * num:3 * num]),) if with_gates else ()
  return (out, tuple(new[:num]), tuple(new[num:2 * num])) + gates + ((new[-1],) if taped else ())


def _rows_folded(call):
  """``call`` (``_forward_call``) whose ``vmap`` over arrays of rows with shared
  weights is one call on their rows folded together ([B, n, ...] -> [B x n, ...],
  a reshape; a tape's alike, each optimizee's rows keeping to its own), rather than
  Pallas's batching: a grid row of programs per optimizee, so that no loop of
  ``forward_stride`` could span more than one optimizee's blocks. Weights (or a
  tape's slot) that differ along the mapped axis keep Pallas's."""
  folded = jax.custom_batching.custom_vmap(call)

  @folded.def_vmap
  def rule(axis_size, in_batched, padded, x, hs, cs, *tape_slot):
    shared = (in_batched[0],) + ((in_batched[-1],) if tape_slot else ())
    if any(jax.tree_util.tree_leaves(shared)):
      axes = jax.tree_util.tree_map(lambda b: 0 if b else None, tuple(in_batched))
      outs = jax.vmap(call, in_axes=axes)(padded, x, hs, cs, *tape_slot)
      return outs, jax.tree_util.tree_map(lambda _: True, outs)

    def fold(a, batched):
      a = a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
      return a.reshape((-1,) + a.shape[2:])

    _, x_b, hs_b, cs_b = in_batched[:4]
    extra = (fold(tape_slot[0], in_batched[4]), tape_slot[1]) if tape_slot else ()
    outs = folded(padded, fold(x, x_b), tuple(map(fold, hs, hs_b)), tuple(map(fold, cs, cs_b)),
                  *extra)
    outs = jax.tree_util.tree_map(lambda a: a.reshape((axis_size, -1) + a.shape[1:]), outs)
    return outs, jax.tree_util.tree_map(lambda _: True, outs)

  return folded


def _check_tape(owner: str, tape: chex.Array, slot: chex.Array, n: int,
                sizes: Tuple[int, ...], n_in: int) -> None:
  width = (2 if jnp.finfo(tape.dtype).bits < 32 else 1) * n_in + 2 * sum(sizes)
  if tape.ndim != 2 or tape.shape[0] % n or tape.shape[1] != width:
    raise ValueError(f"lstm_kernel.{owner}: tape {tape.shape} must be [steps x {n} rows, "
                     f"{width}] ([x, h's, c's] of a {tape.dtype} tape)")
  if slot is None or slot.shape != (1,) or slot.dtype != jnp.int32:
    raise ValueError(f"lstm_kernel.{owner}: with a tape, slot must be int32 [1], got "
                     f"{None if slot is None else (slot.shape, slot.dtype)}")


# The backward kernel's rows and warps per program. It writes each layer's gate
# cotangents and output, from which ``weights_gradient`` forms the weights'
# gradient: summing those products over a program's rows in this kernel too (a
# loop of blocks per program, the sums held through it) overflowed the registers
# (ptxas, sm_90a: 255 registers and a ~2 KB stack frame of spills per thread at
# any block size) and ran 60x slower than XLA's whole backward pass on an H100
# (W1 L2O-DM B = 64: 37 ms per step). Without them, ptxas: 245-247 registers, no
# spills at 64 rows, 8 warps (40 bytes of spills at 32 rows). At 64 rows its SASS has
# two warpgroups each compute all of a [64, 32] tile, so at 128 rows and 8 warps every
# thread issues about the same instructions for twice the rows (ptxas: L2O-DM 255
# registers and 24 bytes of spills, RNNProp 254 and none, a bfloat16 state 255 and
# none). Timed on an H100 (W1 L2O-DM, BENCHMARKS.md), 128 rows made the kernel 1.33x
# faster at B = 64 (3.07 -> 2.31 ms per step) and 1.34x at B = 1.
BACKWARD_BLOCK_ROWS = 128
BACKWARD_NUM_WARPS = 8
# Blocks of rows per program, in a loop, and software-pipeline stages of that loop
# (with more than one block and stage, the next block's inputs are fetched while one
# is computed: at ~245 registers a multiprocessor runs one program, which otherwise
# waits on its loads before it computes). ptxas (sm_90a), L2O-DM: 2 or 4 blocks and
# 2 stages pipeline the loads (cp.async) in 255 registers, no spills (4: 8 bytes);
# 3 stages need more shared memory than an H100 has, and RNNProp's wider inputs at
# 2 stages too. Timed on an H100 (BENCHMARKS.md): 2 blocks and 2 stages made the
# kernel 1.18x slower at B = 64, so 1 and 1 (no loop).
BACKWARD_BLOCKS_PER_PROGRAM = 1
BACKWARD_NUM_STAGES = 1
# Whether the layers below the top keep their recomputed gates for their backward
# pass instead of computing them a second time there. Not yet timed on a GPU.
KEEP_LOWER_GATES = False
# Whether the backward kernel writes the weights' gradient's operands (each layer's
# gate cotangents dz and output) in bfloat16 rather than float32: they are written
# and read back once per step (1,600 of the ~4,000 bytes per row and step of L2O-DM at
# B = 64 as compiled, with a residual tape), and read only by the products of the
# weights' gradient, which take their operands at TF32's precision anyway (10-bit
# mantissa; bfloat16 keeps 8). The cotangents that flow on (dx, dh, dc) stay float32.
# An int, for the benchmark's --kernel_constant. Not yet timed.
NARROW_COTANGENTS = 0

# Rows per block, warps and software-pipeline stages of ``weights_gradient``'s
# programs: with 3 stages each block's loads are issued asynchronously (cp.async)
# while the block before is multiplied; ptxas (sm_90a): 154 registers, no spills
# (1 stage: 108; 4 warps: 255 at 1, 2 or 3 stages). On an H100 it takes 0.73 ms per
# step at B = 64 since its loads are contiguous (2.42 ms when each was a gather), ~2x
# its loads' time, one program of 8 warps per multiprocessor; blocks of 128 rows at 2
# stages were 1.11x slower. With 1 stage, 108 registers let two programs share one
# (GRADIENT_PROGRAMS_PER_CORE = 2); not yet timed.
GRADIENT_BLOCK_ROWS = 64
GRADIENT_NUM_WARPS = 8
GRADIENT_NUM_STAGES = 3
# Programs of ``weights_gradient`` a multiprocessor runs at once, for sizing the partial
# sums (``backward_chunks``): what its registers and shared memory allow.
GRADIENT_PROGRAMS_PER_CORE = 1


def backward_chunks(batch: int, rows: int, cores: int, max_chunks: int = 1024) -> int:
  """Partial sums per optimizee of the weights' gradient (``cells.LSTMStack``'s
  ``gradient_chunks``) for ``batch`` optimizees of ``rows`` rows each on a GPU of
  ``cores`` multiprocessors, with the fused kernels.

  Each step's products [x, h, 1]^T dz then run as batch x chunks independent
  sums over a share of the rows (``weights_gradient``'s programs,
  ``GRADIENT_PROGRAMS_PER_CORE`` at a time per multiprocessor), in
  ceil(batch x chunks / (cores x GRADIENT_PROGRAMS_PER_CORE)) rounds of blocks of
  ``GRADIENT_BLOCK_ROWS`` rows; a loop of steps adds each into its
  accumulator, so fewer is less memory moved: the fewest chunks whose
  block-times are within 5% of the fewest possible. For L2O-DM's 15,910 rows on
  132 multiprocessors, 125 at B = 1 (a fixed 64 leaves half of them idle), 16
  at B = 8, 2 at B = 64, 1 at B = 256.
  """
  if batch < 1 or rows < 1 or cores < 1:
    raise ValueError(f"backward_chunks: batch={batch}, rows={rows} and cores={cores} must "
                     "be positive")
  slots = cores * GRADIENT_PROGRAMS_PER_CORE

  def block_times(chunks):
    blocks = -(-(-(-rows // chunks)) // GRADIENT_BLOCK_ROWS)
    return -(-batch * chunks // slots) * blocks

  candidates = range(1, min(max_chunks, rows) + 1)
  fastest = min(map(block_times, candidates))
  return next(c for c in candidates if block_times(c) <= 1.05 * fastest)


def _dot_t(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b.T as one product (Triton transposes an operand in the product's load)."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())))


def _backward_kernel(*refs, sizes: Tuple[int, ...], n_in: int, n_out: int, n: int,
                     split_x: bool, tanh, gate, taped: bool = False):
  # tanh, gate: ``_tanh``'s and ``_gate``'s
  # refs: saved, d_out, dh_0.., dc_0.., wx_0.., wh_0.., b_0.., w_out [, slot]
  #       | dx, dh'_0.., dc'_0.., dz_0.., out_0..
  num = len(sizes)
  saved_ref, d_out_ref, refs = refs[0], refs[1], refs[2:]
  dh_in, dc_in, refs = refs[:num], refs[num:2 * num], refs[2 * num:]
  wx_refs, wh_refs, b_refs, refs = (refs[:num], refs[num:2 * num], refs[2 * num:3 * num],
                                    refs[3 * num:])
  w_out_ref, refs = refs[0], refs[1:]
  slot_ref, refs = (refs[0], refs[1:]) if taped else (None, refs)
  dx_ref, refs = refs[0], refs[1:]
  dh_out, dc_out, dz_refs, out_refs = (refs[:num], refs[num:2 * num], refs[2 * num:3 * num],
                                       refs[3 * num:])
  pl, plt = _pallas()

  packed = packs_input(n_in, sizes[0])
  # column offsets of h_l, c_l in the saved inputs [x, h's, c's] (x: [hi, lo] if split_x)
  x_width = 2 * n_in if split_x else n_in
  h_at = [x_width + sum(sizes[:l]) for l in range(num)]
  c_at = [x_width + sum(sizes) + sum(sizes[:l]) for l in range(num)]

  program = pl.program_id(0)

  def block(j, carry):
    """One block of rows: a loop of them per program lets the next block's loads be
    issued while one is computed (``BACKWARD_NUM_STAGES``)."""
    first = (program * BACKWARD_BLOCKS_PER_PROGRAM + j) * BACKWARD_BLOCK_ROWS
    rows = first + jnp.arange(BACKWARD_BLOCK_ROWS)
    row_ok = (rows < n)[:, None]
    # the saved inputs' rows: in a tape, those of its slot
    saved_rows = rows if slot_ref is None else slot_ref[0] * n + rows

    def cols(width, offset=0):
      c = jnp.arange(_padded(width))
      return row_ok & (c < width)[None, :], offset + c[None, :]

    def load(ref, width, offset=0):
      mask, c = cols(width, offset)
      at = saved_rows if ref is saved_ref else rows
      return plt.load(ref.at[at[:, None], c], mask=mask, other=0.0).astype(jnp.float32)

    def lanes(width, shift, outside=0):
      """(mask, columns) of lanes [shift, shift + width) of a first-layer tile; the
      other lanes' columns ``outside`` (out of bounds for a store: an interpreted
      masked store writes every lane, and its masked lanes must not alias one)."""
      c = jnp.arange(_padded(sizes[0]))
      inside = (c >= shift) & (c < shift + width)
      return row_ok & inside[None, :], jnp.where(inside, c - shift, outside)[None, :]

    def load_x_beside_h():  # [0 (h's lanes), x, 0]
      mask, c = lanes(n_in, sizes[0])
      x = plt.load(saved_ref.at[saved_rows[:, None], c], mask=mask,
                   other=0.0).astype(jnp.float32)
      if split_x:
        x += plt.load(saved_ref.at[saved_rows[:, None], n_in + c], mask=mask,
                      other=0.0).astype(jnp.float32)
      return x

    def store(ref, value, width, offset=0):
      mask, c = cols(width, offset)
      plt.store(ref.at[rows[:, None], c], value.astype(ref.dtype), mask=mask)

    def gates(l, x):  # (the product's h operand, the gates i, j, f, o)
      h = load(saved_ref, sizes[l], h_at[l])
      if l == 0 and packed:
        h += load_x_beside_h()
        z = [jnp.dot(h, wh_refs[l][g]) + b_refs[l][g][None, :] for g in range(4)]
      else:
        z = [jnp.dot(x, wx_refs[l][g]) + jnp.dot(h, wh_refs[l][g]) + b_refs[l][g][None, :]
             for g in range(4)]
      return h, [tanh(z[g]) if g == 1 else gate(z[g]) for g in range(4)]

    # The forward pass again, keeping each layer's input and writing each layer's
    # output (the next layer's input, the read-out's: operands of the weights'
    # gradient). The top layer's gates serve its backward pass at once; those below
    # are recomputed where the backward pass reaches them (held through the layers
    # above, they spill), unless KEEP_LOWER_GATES.
    xs = [None if packed else load(saved_ref, n_in) + load(saved_ref, n_in, n_in) if split_x
          else load(saved_ref, n_in)]
    kept = [None] * num
    for l in range(num):
      h, a = gates(l, xs[l])
      c = load(saved_ref, sizes[l], c_at[l])
      xs.append(a[3] * tanh(a[2] * c + a[0] * a[1]))
      store(out_refs[l], xs[-1], sizes[l])
      if KEEP_LOWER_GATES or l == num - 1:
        kept[l] = (h, a, c)
    dx = _dot_t(load(d_out_ref, n_out), w_out_ref[...])
    for l in reversed(range(num)):
      if kept[l] is not None:
        h, a, c = kept[l]
      else:
        h, a = gates(l, xs[l])
        c = load(saved_ref, sizes[l], c_at[l])
      i, cand, f, o = a
      tc = tanh(f * c + i * cand)
      dh = load(dh_in[l], sizes[l]) + dx
      dc = load(dc_in[l], sizes[l]) + dh * o * (1.0 - tc * tc)
      # d/dz of the candidate tanh(z) is 1 - tanh(z)^2; of a gate s = (1 + tanh(z)) / 2,
      # 2 s (1 - s)
      da = [dc * cand, dc * i, dc * c, dh * tc]
      dz = [d * (1.0 - cand * cand) if g == 1 else (d + d) * s * (1.0 - s)
            for g, (d, s) in enumerate(zip(da, a))]
      for g in range(4):  # gate columns i, j, f, o of the layer's [rows, 4 x hidden]
        store(dz_refs[l], dz[g], sizes[l], offset=g * sizes[l])
      dh = sum(_dot_t(dz[g], wh_refs[l][g]) for g in range(4))
      store(dh_out[l], dh, sizes[l])
      store(dc_out[l], dc * f, sizes[l])
      if l == 0 and packed:  # x's cotangent from h's product
        mask, c = lanes(n_in, sizes[0], outside=n_in)
        plt.store(dx_ref.at[rows[:, None], c], dh, mask=mask)
        continue
      dx = sum(_dot_t(dz[g], wx_refs[l][g]) for g in range(4))
    if not packed:
      store(dx_ref, dx, n_in)

    return carry

  jax.lax.fori_loop(0, BACKWARD_BLOCKS_PER_PROGRAM, block, 0)


def _saved_layout(saved: chex.Array, sizes: Tuple[int, ...]) -> Tuple[int, bool]:
  """(input width, whether x is saved as two halves [hi, lo]) of the saved inputs
  [x, h's, c's] (``cells._saved_inputs``): halves where they are narrower than float32."""
  split_x = jnp.finfo(saved.dtype).bits < 32
  return (saved.shape[-1] - 2 * sum(sizes)) // (2 if split_x else 1), split_x


def stack_backward(padded: PaddedStack, saved: chex.Array, d_out: chex.Array,
                   dh_news: Sequence[chex.Array], dc_news: Sequence[chex.Array],
                   interpret: bool = False, slot: Optional[chex.Array] = None) -> Tuple:
  """The stack's backward pass through its cells, from its saved inputs, in one kernel.

  ``saved``: [n, n_in + 2 x sum(hidden)], the step's inputs [x, h's, c's] (the
  only residual: the gates are recomputed); in a dtype narrower than float32
  (a bfloat16 state's) x is saved as two columns each, [hi, lo] with x = hi +
  lo (``cells._saved_inputs``). ``d_out`` [n, n_out], ``dh_news``,
  ``dc_news``: cotangents of the read-out and the new states (those of a
  bfloat16 state in bfloat16). Returns (dx, dh's, dc's, dz's, outs): the
  cotangents of x and of the old states, each layer's gate pre-activation
  cotangents dz [n, 4 x hidden] (columns i, j, f, o) and output h' [n, hidden]
  (the operands of ``weights_gradient``); dh's and dc's in the dtypes of
  ``dh_news`` and ``dc_news``, dz's and outs in bfloat16 if ``NARROW_COTANGENTS``,
  the rest in float32.
  ``slot`` (int32 [1]): ``saved`` is a tape [steps x n, width] (``stack_forward``'s)
  and the step's inputs are its rows [slot x n, (slot + 1) x n), read in place.
  """
  pl, plt = _pallas()
  n, n_out = d_out.shape
  sizes = tuple(d.shape[-1] for d in dh_news)
  n_in, split_x = _saved_layout(saved, sizes)
  taped = slot is not None
  if taped:
    _check_tape("stack_backward", saved, slot, n, sizes, n_in)
  dtype = jnp.float32
  operands = jnp.bfloat16 if NARROW_COTANGENTS else dtype  # the weights' gradient's
  out_shape = ([jax.ShapeDtypeStruct((n, n_in), dtype)]
               + [jax.ShapeDtypeStruct(d.shape, d.dtype) for d in (*dh_news, *dc_news)]
               + [jax.ShapeDtypeStruct((n, 4 * s), operands) for s in sizes]
               + [jax.ShapeDtypeStruct((n, s), operands) for s in sizes])
  kernel = functools.partial(_backward_kernel, sizes=sizes, n_in=n_in, n_out=n_out, n=n,
                             split_x=split_x, tanh=_tanh(interpret), gate=_gate(interpret),
                             taped=taped)
  num = len(sizes)
  dx, *rest = pl.pallas_call(
      kernel, out_shape=out_shape,
      grid=(pl.cdiv(n, BACKWARD_BLOCK_ROWS * BACKWARD_BLOCKS_PER_PROGRAM),),
      compiler_params=plt.CompilerParams(num_warps=BACKWARD_NUM_WARPS,
                                         num_stages=BACKWARD_NUM_STAGES),
      # dh and dc in place: each program reads its rows' cotangents before it writes them
      input_output_aliases={2 + i: 1 + i for i in range(2 * num)},
      interpret=interpret, name="lstm_stack_backward",
  )(saved, d_out.astype(dtype), *dh_news, *dc_news, *padded.wx, *padded.wh, *padded.b,
    padded.w_out, *([slot] if taped else []))
  return (dx, tuple(rest[:num]), tuple(rest[num:2 * num]), tuple(rest[2 * num:3 * num]),
          tuple(rest[3 * num:]))


def gradient_offsets(n_in: int, sizes: Tuple[int, ...], n_out: int) -> Tuple[int, ...]:
  """Where each matrix with its bias as last row ([fan_in + 1, 4 x hidden] per layer,
  [hidden + 1, n_out] for the read-out) starts in the flat weights' gradient
  (``cells.LSTMStack.grad``), and, last, its size."""
  fan_ins = (n_in,) + tuple(sizes[:-1])
  widths = [(f + s + 1) * 4 * s for f, s in zip(fan_ins, sizes)] + [(sizes[-1] + 1) * n_out]
  return tuple(int(o) for o in np.cumsum([0] + widths))


def _gradient_kernel(*refs, sizes: Tuple[int, ...], n_in: int, n_out: int, n: int,
                     chunks: int, split_x: bool, taped: bool = False, adds: bool = False):
  # refs: saved, out_0.., dz_0.., d_out [, slot] [, d_grad in (aliased)] | d_grad
  num = len(sizes)
  saved_ref, refs = refs[0], refs[1:]
  out_refs, dz_refs, d_out_ref, d_grad_ref = refs[:num], refs[num:2 * num], refs[2 * num], refs[-1]
  pl, plt = _pallas()
  program = pl.program_id(0)
  # the saved inputs' first row: in a tape, its slot's
  saved_first = refs[2 * num + 1][0] * n if taped else None
  per = -(-n // chunks)  # rows of each program: one partial sum
  first, end = program * per, jnp.minimum(program * per + per, n)
  x_width = 2 * n_in if split_x else n_in

  def product(operands, fan_in, d_ref, d_width, start):
    """Adds up [a, 1]^T d over this program's rows and writes the sum as rows
    [start, ...) of d_grad's flat layout ([fan_in + 1, d_width]); a's lanes
    [shift, shift + width) hold columns [column, column + width) of ref for each
    (ref, column, width, shift) of ``operands`` (summed where two share lanes),
    the bias's 1 in lane fan_in."""
    lanes, d_lanes = _padded(fan_in + 1), _padded(d_width)
    # One load per (ref, column - shift): operands at the same offset (x's low half and h
    # beside it) share it, their lanes being disjoint. Its columns are then the lanes
    # plus a constant, which the compiler can load several at a time; a map of lanes to
    # columns (a gather) is loaded one element at a time.
    loads = []
    for ref, column, width, shift in operands:
      same = next((l for l in loads if l[0] is ref and l[1] == column - shift), None)
      if same is None:
        loads.append((ref, column - shift, [(shift, shift + width)]))
      else:
        same[2].append((shift, shift + width))

    def body(block, acc):
      rows = first + block * GRADIENT_BLOCK_ROWS + jnp.arange(GRADIENT_BLOCK_ROWS)
      row_ok = (rows < end)[:, None]
      lane = jnp.arange(lanes)[None, :]
      a = jnp.where(row_ok & (lane == fan_in), 1.0, 0.0)
      for ref, offset, spans in loads:
        inside = functools.reduce(jnp.logical_or, [(lane >= lo) & (lane < hi) for lo, hi in spans])
        at = rows if ref is not saved_ref or saved_first is None else saved_first + rows
        a += plt.load(ref.at[at[:, None], offset + lane], mask=row_ok & inside,
                      other=0.0).astype(jnp.float32)
      c = jnp.arange(d_lanes)[None, :]
      d = plt.load(d_ref.at[rows[:, None], c], mask=row_ok & (c < d_width),
                   other=0.0).astype(jnp.float32)
      return acc + jax.lax.dot_general(a, d, (((0,), (0,)), ((), ())))

    acc = jax.lax.fori_loop(0, -(-per // GRADIENT_BLOCK_ROWS), body,
                            jnp.zeros((lanes, d_lanes), jnp.float32))
    r, c = jnp.arange(lanes)[:, None], jnp.arange(d_lanes)[None, :]
    mask = (r <= fan_in) & (c < d_width)
    # masked entries out of bounds: an interpreted store writes them too
    at = jnp.where(mask, start + r * d_width + c, d_grad_ref.shape[-1])
    if adds:  # into the sum so far, in place: this program alone reads and writes its row
      acc += plt.load(d_grad_ref.at[program, at], mask=mask, other=0.0)
    plt.store(d_grad_ref.at[program, at], acc, mask=mask)

  starts = gradient_offsets(n_in, sizes, n_out)
  for l, s in enumerate(sizes):
    h = (saved_ref, x_width + sum(sizes[:l]), s)
    if l == 0:  # x, as two halves [hi, lo] summed in the same lanes if split_x
      xs = [(saved_ref, 0, n_in, 0)] + ([(saved_ref, n_in, n_in, 0)] if split_x else [])
    else:
      xs = [(out_refs[l - 1], 0, sizes[l - 1], 0)]
    fan_in = (n_in if l == 0 else sizes[l - 1]) + s
    product(xs + [h + (fan_in - s,)], fan_in, dz_refs[l], 4 * s, starts[l])
  product([(out_refs[-1], 0, sizes[-1], 0)], sizes[-1], d_out_ref, n_out, starts[-2])


def weights_gradient(saved: chex.Array, outs: Sequence[chex.Array], dzs: Sequence[chex.Array],
                     d_out: chex.Array, chunks: int, interpret: bool = False,
                     slot: Optional[chex.Array] = None,
                     add_to: Optional[chex.Array] = None) -> chex.Array:
  """The weights' gradient [chunks, size] in the flat layout of ``cells.LSTMStack.grad``
  from ``stack_backward``'s operands, in one kernel: each layer's [x, h, 1]^T dz (x the
  saved input or the layer below's output, h the saved state) and the read-out's
  [h'_top, 1]^T d_out, each of the ``chunks`` rows a partial sum over a contiguous
  share of the rows, written once by the program that owns them (no atomics: the same
  sums on every run). A block's product is accumulated in registers, one product at a
  time, where XLA's split-K products copied both operands to pad them. ``slot``: as
  ``stack_backward``'s. ``add_to`` [chunks, size] float32: the result is ``add_to``
  plus the gradient, added in place (a loop's running sum: no kernel of its own)."""
  pl, plt = _pallas()
  n, n_out = d_out.shape
  sizes = tuple(o.shape[-1] for o in outs)
  n_in, split_x = _saved_layout(saved, sizes)
  taped = slot is not None
  if taped:
    _check_tape("weights_gradient", saved, slot, n, sizes, n_in)
  size = gradient_offsets(n_in, sizes, n_out)[-1]
  out_shape = jax.ShapeDtypeStruct((chunks, size), jnp.float32)
  adds = add_to is not None
  if adds and (add_to.shape, add_to.dtype) != (out_shape.shape, out_shape.dtype):
    raise ValueError(f"lstm_kernel.weights_gradient: add_to {add_to.shape} {add_to.dtype} "
                     f"must be {out_shape.shape} float32")
  kernel = functools.partial(_gradient_kernel, sizes=sizes, n_in=n_in, n_out=n_out, n=n,
                             chunks=chunks, split_x=split_x, taped=taped, adds=adds)
  operands = [saved, *outs, *dzs, d_out.astype(jnp.float32), *([slot] if taped else [])]
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(chunks,),
      compiler_params=plt.CompilerParams(num_warps=GRADIENT_NUM_WARPS,
                                         num_stages=GRADIENT_NUM_STAGES),
      input_output_aliases={len(operands): 0} if adds else {},
      interpret=interpret, name="lstm_stack_weights_gradient",
  )(*operands, *([add_to] if adds else []))
