"""A fused GPU kernel (Pallas, Triton backend) for the forward pass of an LSTM stack.

``cells.lstm_stack_apply`` as XLA compiles it writes each layer's gate
pre-activations [rows, 4 x hidden] to memory and reads them back (a GEMM's
output cannot be fused with the cell's mixing of its four gate blocks), plus a
concatenation of [x, h] per layer: at hidden 20 that is ~340 floats moved per
row and layer for ~100 that the cell needs. This kernel reads each row's x, h
and c once, keeps the gates in registers, and writes only the new h and c and
the read-out: one launch per step for the whole stack.

It computes the same function as ``cells._stack_core`` in its primal (not
differentiated) form, with TF32 matrix products like XLA's default for float32
on GPUs. Hidden and input sizes are padded to powers of two >= 16 inside the
kernel (Triton's matrix-product tiles) by zero weight rows and columns, which
leave the padded lanes at exactly zero.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp

# Rows per program and warps per program (read when a program is traced).
BLOCK_ROWS = 64  # at 128 the variant writing the gates spills registers (ptxas, sm_90a)
NUM_WARPS = 4


def _padded(size: int) -> int:
  return max(16, 1 << (size - 1).bit_length())


def _pallas():
  """(pallas, its Triton backend), imported when a kernel is built: an experimental
  API whose changes should break the fused kernel, not the import of l2ojax."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt
  return pl, plt


class PaddedStack(NamedTuple):
  """Pre-scaled stack weights split per gate and zero-padded for the kernel."""
  wx: Tuple[chex.Array, ...]  # per layer [4, padded input, padded hidden]
  wh: Tuple[chex.Array, ...]  # per layer [4, padded hidden, padded hidden]
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
    wh.append(jnp.pad(gates[:, n_in:], ((0, 0), (0, hp - hidden), (0, hp - hidden))))
    b.append(jnp.pad(bias.reshape(4, hidden), ((0, 0), (0, hp - hidden))))
    n_in = hidden
  n_out = w_out.shape[1]
  w_out = jnp.pad(w_out, ((0, _padded(n_in) - n_in), (0, _padded(n_out) - n_out)))
  return PaddedStack(tuple(wx), tuple(wh), tuple(b), w_out,
                     jnp.pad(b_out, (0, _padded(n_out) - n_out)))


def _kernel(*refs, num_layers: int, sizes: Tuple[int, ...], n_in: int, n_out: int,
            with_gates: bool):
  # refs: x, h_0.., c_0.., wx_0.., wh_0.., b_0.., w_out, b_out | out, h'_0.., c'_0.. [, t_0..]
  x_ref, refs = refs[0], refs[1:]
  h_refs, c_refs = refs[:num_layers], refs[num_layers:2 * num_layers]
  wx_refs = refs[2 * num_layers:3 * num_layers]
  wh_refs = refs[3 * num_layers:4 * num_layers]
  b_refs = refs[4 * num_layers:5 * num_layers]
  w_out_ref, b_out_ref, out_ref = refs[5 * num_layers:5 * num_layers + 3]
  h_out_refs = refs[5 * num_layers + 3:6 * num_layers + 3]
  c_out_refs = refs[6 * num_layers + 3:7 * num_layers + 3]
  t_refs = refs[7 * num_layers + 3:]
  pl, plt = _pallas()

  n = x_ref.shape[0]
  rows = pl.program_id(0) * BLOCK_ROWS + jnp.arange(BLOCK_ROWS)
  row_ok = (rows < n)[:, None]

  def load(ref, width):
    cols = jnp.arange(_padded(width))
    mask = row_ok & (cols < width)[None, :]
    return plt.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0)

  def store(ref, value, width, offset=0):
    cols = jnp.arange(_padded(width))
    mask = row_ok & (cols < width)[None, :]
    plt.store(ref.at[rows[:, None], offset + cols[None, :]], value.astype(ref.dtype), mask=mask)

  x = load(x_ref, n_in).astype(jnp.float32)
  for l, hidden in enumerate(sizes):
    h = load(h_refs[l], hidden).astype(jnp.float32)
    c = load(c_refs[l], hidden).astype(jnp.float32)
    # one tanh per gate: i, f, o = (1 + t) / 2 and j = t (weights pre-scaled)
    t = [jnp.tanh(jnp.dot(x, wx_refs[l][g]) + jnp.dot(h, wh_refs[l][g]) + b_refs[l][g][None, :])
         for g in range(4)]
    c = (0.5 * t[2] + 0.5) * c + (0.5 * t[0] + 0.5) * t[1]
    x = (0.5 * t[3] + 0.5) * jnp.tanh(c)
    store(h_out_refs[l], x, hidden)
    store(c_out_refs[l], c, hidden)
    if with_gates:  # what the backward pass keeps (cells._stack_core_fwd)
      for g in range(4):
        store(t_refs[l], t[g], hidden, offset=g * hidden)
  store(out_ref, jnp.dot(x, w_out_ref[...]) + b_out_ref[...][None, :], n_out)


def stack_forward(padded: PaddedStack, x: chex.Array, hs: Sequence[chex.Array],
                  cs: Sequence[chex.Array], n_out: int, interpret: bool = False,
                  with_gates: bool = False) -> Tuple[chex.Array, ...]:
  """(read-out [n, n_out], new h's, new c's) of the stack on rows ``x`` [n, n_in].

  ``hs``, ``cs``: per layer [n, hidden]. Outputs are float32 like the weights.
  ``with_gates``: also each layer's gate tanh t [n, 4 x hidden] (columns i, j,
  f, o), what ``cells._stack_core_fwd`` keeps for the backward pass.
  ``interpret``: run the kernel's program on the current backend (any platform;
  slow) instead of compiling it for a GPU.
  """
  pl, plt = _pallas()
  if x.ndim != 2:
    raise ValueError(f"lstm_kernel.stack_forward: x must be [rows, features], got {x.shape}")
  n, n_in = x.shape
  sizes = tuple(h.shape[-1] for h in hs)
  dtype = jnp.float32
  hs = [h.astype(dtype) for h in hs]
  cs = [c.astype(dtype) for c in cs]
  out_shape = ([jax.ShapeDtypeStruct((n, n_out), dtype)]
               + [jax.ShapeDtypeStruct((n, s), dtype) for s in sizes] * 2
               + [jax.ShapeDtypeStruct((n, 4 * s), dtype) for s in sizes if with_gates])
  kernel = functools.partial(_kernel, num_layers=len(sizes), sizes=sizes, n_in=n_in,
                             n_out=n_out, with_gates=with_gates)
  out, *new = pl.pallas_call(
      kernel, out_shape=out_shape, grid=(pl.cdiv(n, BLOCK_ROWS),),
      compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=1),
      # Each program reads its rows' h and c before it writes them: updating them in
      # place saves a loop carrying the state a copy of it per step. (Differentiated,
      # XLA stacks the old state for the backward pass before the call: no copy either.)
      input_output_aliases={i: i for i in range(1, 2 * len(sizes) + 1)},
      interpret=interpret, name="lstm_stack_forward",
  )(x, *hs, *cs, *padded.wx, *padded.wh, *padded.b, padded.w_out, padded.b_out)
  num = len(sizes)
  gates = (tuple(new[2 * num:]),) if with_gates else ()
  return (out, tuple(new[:num]), tuple(new[num:2 * num])) + gates
