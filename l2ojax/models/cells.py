"""Recurrent cells shared by the learned optimizers, applied coordinatewise.

Every row of the input is one optimizee coordinate, so a cell is a plain
batched matmul over [num_coordinates, features].
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from l2ojax import gpu, products
from l2ojax.models import lstm_kernel, residuals


class LSTMState(NamedTuple):
  h: chex.Array  # [n, hidden]
  c: chex.Array  # [n, hidden]


def truncated_normal(key: chex.PRNGKey, shape, fan_in: int) -> chex.Array:
  """Sonnet v1's default: truncated normal (2 std) with std 1/sqrt(fan_in)."""
  return jax.random.truncated_normal(key, -2.0, 2.0, shape) / jnp.sqrt(fan_in)


def lstm_init(key: chex.PRNGKey, input_size: int, hidden: int) -> dict:
  fan_in = input_size + hidden
  return {"w": truncated_normal(key, (fan_in, 4 * hidden), fan_in),
          "b": jnp.zeros((4 * hidden,))}


def lstm_zero_state(n: int, hidden: int, dtype=jnp.float32) -> LSTMState:
  zeros = jnp.zeros((n, hidden), dtype)
  return LSTMState(zeros, zeros)


def _gate_affine(hidden: int, forget_bias: float):
  """Column constants (scale, add) for the weights so that one tanh over all
  four gate blocks gives sigmoid(i), tanh(j), sigmoid(f + forget_bias), sigmoid(o).

  sigmoid(z) = 0.5 * tanh(z / 2) + 0.5: with t = tanh(scale * (z + add)),
  i, f, o = (1 + t) / 2 and j = t (``_lstm_core``).
  """
  half, one, zero = np.full(hidden, 0.5), np.ones(hidden), np.zeros(hidden)
  scale = np.concatenate([half, one, half, half])                # i, j, f, o
  add = np.concatenate([zero, zero, np.full(hidden, forget_bias), zero])
  return scale, add


def _next_state(t, c):
  """(h', c') from the gates' tanh t and the cell state c."""
  ti, j, tf, to = jnp.split(t, 4, axis=-1)
  c_new = (0.5 * tf + 0.5) * c + (0.5 * ti + 0.5) * j
  return (0.5 * to + 0.5) * jnp.tanh(c_new), c_new


def _cell_forward(w, b, x, h, c):
  """(h', c', t) of one pre-scaled cell: t = tanh([x, h] @ w + b) holds all four gates."""
  t = jnp.tanh(jnp.concatenate([x, h], axis=-1) @ w + b)
  return (*_next_state(t, c), t)


# On a GPU a loop of steps accumulates the weights' gradient in this many
# partial sums over the coordinates (LSTMStack): each step's product then adds
# into its accumulator in one kernel, where one sum takes a padded split-K
# product, a reduction and an addition. On a CPU one product is faster.
GRADIENT_CHUNKS = 64


def default_gradient_chunks() -> int:
  """``GRADIENT_CHUNKS`` where the default backend is a GPU, else 1."""
  return GRADIENT_CHUNKS if jax.default_backend() == "gpu" else 1


def auto_gradient_chunks(kernel: str, gradient_chunks: int, batch: int, rows: int,
                         cores: Optional[int] = None) -> int:
  """``gradient_chunks`` for a loop differentiated over ``batch`` optimizees of ``rows``
  coordinates each: an explicit (non-zero) value as it is; with the fused kernels
  (``kernel="pallas"``) on a GPU of ``cores`` multiprocessors (default: the first
  device's, where the backend is a GPU), ``lstm_kernel.backward_chunks``; else 0
  (``default_gradient_chunks``).
  """
  if gradient_chunks or kernel != "pallas":
    return gradient_chunks
  if cores is None and jax.default_backend() == "gpu":
    cores = getattr(jax.devices()[0], "core_count", None)
  return lstm_kernel.backward_chunks(batch, rows, cores) if cores else 0


def check_gradient_chunks(owner: str, value) -> None:
  """A clear error unless ``value`` is a valid ``gradient_chunks`` (int >= 0)."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ValueError(f"{owner}: gradient_chunks={value!r}; a positive int, "
                     "or 0 for the backend's default")


def _chunk_rows(m: chex.Array, k: int) -> chex.Array:
  """[rows..., f] -> [k * ceil(rows / k), f], zero rows appended."""
  m = m.reshape(-1, m.shape[-1])
  return jnp.pad(m, ((0, -m.shape[0] % k), (0, 0)))


def _chunked_outer(a: chex.Array, d: chex.Array, k: int) -> chex.Array:
  """[k, fa, fd] partial sums over rows of a[r]^T d[r], rows as ``_chunk_rows``."""
  per = a.shape[0] // k
  return jnp.einsum("kri,krj->kij", a.reshape(k, per, -1), d.reshape(k, per, -1))


def _cell_backward(wt, x, h, c, t, dh_new, dc_new, k=1):
  """(d[w; b] in ``k`` partial sums, dx, dh, dc) of one cell from its inputs and t
  (c' and tanh(c') recomputed); ``wt`` is w transposed."""
  ti, j, tf, to = jnp.split(t, 4, axis=-1)
  i, f, o = 0.5 * ti + 0.5, 0.5 * tf + 0.5, 0.5 * to + 0.5
  tc = jnp.tanh(f * c + i * j)
  dc = dc_new + dh_new * o * (1.0 - tc * tc)
  dt = jnp.concatenate([0.5 * dc * j, dc * i, 0.5 * dc * c, 0.5 * dh_new * tc], axis=-1)
  # dz padded once, where it is computed, for both products that read it
  dz = _chunk_rows(dt * (1.0 - t * t), k)
  lead = x.shape[:-1]
  dxh = (dz @ wt)[:int(np.prod(lead))].reshape(lead + wt.shape[-1:])
  xh1 = products.with_ones(jnp.concatenate([x, h], axis=-1))
  dwb = _chunked_outer(_chunk_rows(xh1, k), dz, k)
  return dwb, dxh[..., :x.shape[-1]], dxh[..., x.shape[-1]:], dc * f


def _prescaled(params: dict, hidden: int, forget_bias: float, dtype) -> tuple:
  """(w, b) with ``_gate_affine``'s column constants folded in, in ``dtype``."""
  scale, add = (jnp.asarray(a, dtype) for a in _gate_affine(hidden, forget_bias))
  return params["w"] * scale, (params["b"] + add) * scale


@jax.custom_vjp
def _lstm_core(w: chex.Array, b: chex.Array, x: chex.Array, h: chex.Array,
               c: chex.Array) -> tuple:
  """h', c' of the LSTM whose gate columns (i, j, f, o) are pre-scaled so that
  t = tanh([x, h] @ w + b) gives i, f, o = (1 + t) / 2 and j = t."""
  return _lstm_core_fwd(w, b, x, h, c)[0]


def _lstm_core_fwd(w, b, x, h, c):
  h_new, c_new, t = _cell_forward(w, b, x, h, c)
  # Saved for the backward pass: the inputs and t, nothing per gate (c' and
  # tanh(c') are recomputed from them in one elementwise pass).
  return (h_new, c_new), (w.T, x, h, c, t)


def _lstm_core_bwd(res, cotangents):
  dwb, dx, dh, dc = _cell_backward(*res, *cotangents)
  return dwb[0, :-1], dwb[0, -1], dx, dh, dc


_lstm_core.defvjp(_lstm_core_fwd, _lstm_core_bwd)


KERNELS = ("xla", "pallas", "pallas_forward", "pallas_interpret")


class _Layouts(NamedTuple):
  """A stack's weights as the forward pass, the backward pass and the fused kernels
  read them (``LSTMStack``)."""
  ws: Tuple[chex.Array, ...]   # per layer [fan_in, 4 x hidden], pre-scaled
  bs: Tuple[chex.Array, ...]   # per layer [4 x hidden]
  w_out: chex.Array            # [hidden, n_out]
  b_out: chex.Array            # [n_out]
  wts: Tuple[chex.Array, ...]  # ws transposed
  padded: Optional[lstm_kernel.PaddedStack]  # None: XLA's ops


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _stack_core(kernel, log_sign_k, layouts, grad, x, g, hs, cs):
  """Stacked pre-scaled cells (layer l's h' is layer l + 1's x), then the read-out.

  Computed from ``layouts``; the weights' gradient flows to ``grad``
  (``LSTMStack``: the same weights, flat, in partial sums), the layouts get
  none. ``kernel`` (``lstm_stack_prepare``) says which passes run as fused GPU
  kernels. ``log_sign_k``: None, or ``x`` is ``preprocess.log_and_sign(g, k)``
  and a fused forward kernel computes it from ``g`` itself (``g`` gets no
  gradient: x carries it).
  """
  del grad
  if kernel == "xla":
    return _xla_stack(layouts, x, hs, cs)[0]
  return _fused_or_xla(kernel, layouts, x, hs, cs, with_gates=False, g=g,
                       log_sign_k=log_sign_k)


def _flat(a: chex.Array) -> chex.Array:
  return a.reshape((-1, a.shape[-1]))


def _fused_or_xla(kernel, layouts, x, hs, cs, with_gates, g=None, log_sign_k=None):
  """The fused forward kernel or XLA's ops (``gpu.on_gpu``): (out, h's, c's[, ts]) as
  ``_xla_stack``. With ``log_sign_k`` the kernel reads ``g`` and preprocesses it
  itself (``_stack_core``); XLA's ops read ``x``."""
  def fused(layouts, x, g, hs, cs):
    lead = x.shape[:-1]
    outs = lstm_kernel.stack_forward(layouts.padded,
                                     _flat(x) if log_sign_k is None else g.reshape(-1),
                                     [_flat(h) for h in hs], [_flat(c) for c in cs],
                                     layouts.w_out.shape[1],
                                     interpret=kernel == "pallas_interpret",
                                     with_gates=with_gates, log_and_sign_k=log_sign_k)
    unflat = lambda a: a.reshape(lead + a.shape[-1:])
    return (unflat(outs[0]),) + tuple(tuple(unflat(a) for a in group) for group in outs[1:])

  def xla(layouts, x, g, hs, cs):
    del g
    (out, h_news, c_news), ts = _xla_stack(layouts, x, [h.astype(x.dtype) for h in hs],
                                           [c.astype(x.dtype) for c in cs])
    outs = (out, _cast_like(h_news, hs), _cast_like(c_news, cs))
    return outs + ((ts,) if with_gates else ())

  return gpu.on_gpu(kernel, fused, xla, layouts, x, g, hs, cs)


def _cast_like(arrays, likes):
  return tuple(a.astype(like.dtype) for a, like in zip(arrays, likes))


def _narrow(dtype, than) -> bool:
  return jnp.finfo(dtype).bits < jnp.finfo(than).bits


def _saved_inputs(x, hs, cs):
  """The step's inputs [x, h's, c's] as one array: what backprop keeps of a step.

  A state stored narrower than x (bfloat16) is kept in its own dtype, and x
  beside it as two narrow columns each, [hi, lo] with hi + lo = x to ~2^-16
  relative (``_split_inputs``; the fused backward kernel reads the same), so
  that stacking and reading the residual moves half the bytes while the
  backward pass recomputes the gates from the x the forward pass used.
  """
  if _narrow(hs[0].dtype, x.dtype):
    hi = x.astype(hs[0].dtype)
    x = jnp.concatenate([hi, (x - hi.astype(x.dtype)).astype(hi.dtype)], axis=-1)
  return jnp.concatenate([x, *hs, *cs], axis=-1)


def _xla_stack(layouts, x, hs, cs):
  """((out, h's, c's), each layer's gate tanh t) by XLA's ops."""
  h_news, c_news, ts = [], [], []
  for w, b, h, c in zip(layouts.ws, layouts.bs, hs, cs):
    x, c_new, t = _cell_forward(w, b, x, h, c)
    h_news.append(x)
    c_news.append(c_new)
    ts.append(t)
  return (x @ layouts.w_out + layouts.b_out, tuple(h_news), tuple(c_news)), tuple(ts)


def _stack_core_fwd(kernel, log_sign_k, layouts, grad, x, g, hs, cs):
  # Each layer's inputs, as ``_lstm_core``, but not the outputs h' that feed the
  # next layer and the read-out: the step after saves them again as its h. As
  # one array per kind, so that a loop of steps stacks them in one kernel each
  # per step, not one per array: the inputs (stacked before the step overwrites
  # h and c in place) and, unless the backward pass is the fused kernel, which
  # recomputes them, the gates' tanh.
  inputs = _saved_inputs(x, hs, cs)
  if kernel in ("pallas", "pallas_interpret"):
    outs = _fused_or_xla(kernel, layouts, x, hs, cs, with_gates=False, g=g,
                         log_sign_k=log_sign_k)
    return outs, (layouts, grad.shape[0], (inputs,))
  if kernel == "xla":
    outs, ts = _xla_stack(layouts, x, hs, cs)
  else:
    *outs, ts = _fused_or_xla(kernel, layouts, x, hs, cs, with_gates=True, g=g,
                              log_sign_k=log_sign_k)
  return tuple(outs), (layouts, grad.shape[0], (inputs, jnp.concatenate(ts, axis=-1)))


def _split_inputs(layouts, inputs):
  """(x, h's, c's) of the saved inputs (``_saved_inputs``), in the weights' dtype."""
  hidden = [wt.shape[0] // 4 for wt in layouts.wts]
  n_in = layouts.wts[0].shape[1] - hidden[0]
  dtype = layouts.wts[0].dtype
  split_x = _narrow(inputs.dtype, dtype)
  widths = [n_in] * (2 if split_x else 1) + hidden + hidden
  parts = [a.astype(dtype) for a in jnp.split(inputs, np.cumsum(widths)[:-1], axis=-1)]
  if split_x:
    parts = [parts[0] + parts[1]] + parts[2:]
  x, *hcs = parts
  return x, hcs[:len(hidden)], hcs[len(hidden):]


def _stack_core_bwd(kernel, log_sign_k, res, cotangents):
  layouts, k, saved = res
  d_layouts = jax.tree_util.tree_map(jnp.zeros_like, layouts)

  def with_dg(d_grad, dx, dhs, dcs):  # g's gradient flows through x (_stack_core)
    return (d_layouts, d_grad, dx, None if log_sign_k is None else jnp.zeros_like(dx[..., 0]),
            dhs, dcs)

  if len(saved) == 2:
    return with_dg(*_xla_stack_backward(layouts, k, *saved, *cotangents))
  return with_dg(*_recomputing_backward(kernel, layouts, k, saved[0], *cotangents))


def _recomputing_backward(kernel, layouts, k, inputs, d_out, dh_news, dc_news, slot=None,
                          add_to=None):
  """(d_grad, dx, dh's, dc's) of the stack from its saved inputs, the gates recomputed:
  the fused kernels or XLA's ops (``gpu.on_gpu``). ``slot``: ``inputs`` is a tape
  [steps x rows, width] and the step's are its rows [slot x rows, (slot + 1) x rows).
  ``add_to``: d_grad is ``add_to`` plus the step's (the fused kernel adds in place)."""
  lead = d_out.shape[:-1]
  rows = int(np.prod(lead))

  def xla(layouts, inputs, slot, d_out, dh_news, dc_news, add_to):
    if slot is not None:
      inputs = jax.lax.dynamic_slice_in_dim(inputs, slot[0] * rows, rows)
      inputs = inputs.reshape(lead + inputs.shape[-1:])
    ts = _xla_stack(layouts, *_split_inputs(layouts, inputs))[1]
    d_grad, *rest = _xla_stack_backward(layouts, k, inputs, jnp.concatenate(ts, axis=-1),
                                        d_out, dh_news, dc_news)
    return (d_grad if add_to is None else add_to + d_grad, *rest)

  def fused(layouts, inputs, slot, d_out, dh_news, dc_news, add_to):
    # the cells' backward pass in one kernel, the weights' gradient from its outputs in another
    interpret = kernel == "pallas_interpret"
    dx, dhs, dcs, dzs, outs = lstm_kernel.stack_backward(
        layouts.padded, _flat(inputs), _flat(d_out), [_flat(d) for d in dh_news],
        [_flat(d) for d in dc_news], interpret=interpret, slot=slot)
    unflat = lambda a, like: a.reshape(lead + a.shape[-1:]).astype(like.dtype)
    adds = add_to is not None and add_to.dtype == jnp.float32
    d_grad = lstm_kernel.weights_gradient(_flat(inputs), outs, dzs, _flat(d_out), k,
                                          interpret=interpret, slot=slot,
                                          add_to=add_to if adds else None)
    d_grad = d_grad.astype(layouts.w_out.dtype)
    if add_to is not None and not adds:
      d_grad = add_to + d_grad
    return (d_grad, unflat(dx, layouts.ws[0]), tuple(map(unflat, dhs, dh_news)),
            tuple(map(unflat, dcs, dc_news)))

  return gpu.on_gpu(kernel, fused, xla, layouts, inputs, slot, d_out, dh_news, dc_news,
                    add_to)


def _xla_stack_backward(layouts, k, inputs, gates, d_out, dh_news, dc_news):
  """(the flat partial sums [k, size] of every d[w; b], dx, dh's, dc's) by XLA's
  ops, from the saved inputs and gates' tanh; dh's and dc's in their cotangents'
  dtypes."""
  hidden = [wt.shape[0] // 4 for wt in layouts.wts]
  x_in, hs, cs = _split_inputs(layouts, inputs)
  ts = jnp.split(gates, np.cumsum([4 * h for h in hidden])[:-1], axis=-1)
  xs = [x_in] + [_next_state(t, c)[0] for t, c in zip(ts[:-1], cs[:-1])]
  top = _next_state(ts[-1], cs[-1])[0]
  dwb_out = _chunked_outer(_chunk_rows(products.with_ones(top), k), _chunk_rows(d_out, k), k)
  dx = d_out @ layouts.w_out.T  # reaches the top layer's h'
  dwbs, dhs, dcs = [], [], []
  for l in reversed(range(len(layouts.wts))):
    dwb, dx, dh, dc = _cell_backward(layouts.wts[l], xs[l], hs[l], cs[l], ts[l],
                                     dh_news[l] + dx, dc_news[l], k)
    dwbs.append(dwb)
    dhs.append(dh)
    dcs.append(dc)
  d_grad = jnp.concatenate([d.reshape(k, -1) for d in (*dwbs[::-1], dwb_out)], axis=1)
  return (d_grad, dx, _cast_like(dhs[::-1], dh_news), _cast_like(dcs[::-1], dc_news))


_stack_core.defvjp(_stack_core_fwd, _stack_core_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _taped_stack_core(kernel, log_sign_k, accumulates, layouts, grad, x, g, hs, cs, tape, slot):
  """``_stack_core`` (kernel "pallas" or "pallas_interpret") that keeps its saved
  inputs on ``tape`` (``residuals.record``): ((out, h's, c's), new tape, ``grad``
  if ``accumulates`` else None). Its backward pass reads them from the cotangent
  of the new tape, which ``residuals.taped_scan`` makes the tape itself, and
  passes that on; if ``accumulates``, the cotangent of ``grad`` is the one of
  the ``grad`` it returns (the loop's running sum) plus the step's."""
  return _taped_stack_core_fwd(kernel, log_sign_k, accumulates, layouts, grad, x, g, hs, cs,
                               tape, slot)[0]


def _taped_stack_core_fwd(kernel, log_sign_k, accumulates, layouts, grad, x, g, hs, cs, tape,
                          slot):
  lead = x.shape[:-1]
  rows = int(np.prod(lead))

  def fused(layouts, x, g, hs, cs, tape, slot):
    *outs, tape = lstm_kernel.stack_forward(
        layouts.padded, _flat(x) if log_sign_k is None else g.reshape(-1),
        [_flat(h) for h in hs], [_flat(c) for c in cs], layouts.w_out.shape[1],
        interpret=kernel == "pallas_interpret", log_and_sign_k=log_sign_k, tape=tape, slot=slot)
    unflat = lambda a: a.reshape(lead + a.shape[-1:])
    return (unflat(outs[0]), tuple(map(unflat, outs[1])), tuple(map(unflat, outs[2]))), tape

  def xla(layouts, x, g, hs, cs, tape, slot):
    del g
    (out, h_news, c_news), _ = _xla_stack(layouts, x, [h.astype(x.dtype) for h in hs],
                                          [c.astype(x.dtype) for c in cs])
    saved = _flat(_saved_inputs(x, hs, cs)).astype(tape.dtype)
    return ((out, _cast_like(h_news, hs), _cast_like(c_news, cs)),
            jax.lax.dynamic_update_slice_in_dim(tape, saved, slot[0] * rows, 0))

  outs, tape = gpu.on_gpu(kernel, fused, xla, layouts, x, g, hs, cs, tape, slot)
  return (outs, tape, grad if accumulates else None), (layouts, grad.shape[0], slot)


def _taped_stack_core_bwd(kernel, log_sign_k, accumulates, res, cotangents):
  layouts, k, slot = res
  (d_out, dh_news, dc_news), tape, d_sum = cotangents
  d_grad, dx, dhs, dcs = _recomputing_backward(kernel, layouts, k, tape, d_out, dh_news,
                                               dc_news, slot, d_sum if accumulates else None)
  return (jax.tree_util.tree_map(jnp.zeros_like, layouts), d_grad, dx,
          None if log_sign_k is None else jnp.zeros_like(dx[..., 0]), dhs, dcs, tape, None)


_taped_stack_core.defvjp(_taped_stack_core_fwd, _taped_stack_core_bwd)


def lstm_apply(params: dict, x: chex.Array, state: LSTMState,
               forget_bias: float = 1.0) -> LSTMState:
  """Sonnet v1 LSTM: gates = [x, h] @ W + b in order (i, j, f, o).

  This cell is the hot spot of meta-training (it runs once per coordinate,
  step and optimizee), so its gate math is fused: one GEMM of the
  concatenated [x, h], the sigmoids' 1/2 folded into the weight columns, and
  one tanh over all four gate blocks (a sigmoid is an affine map of a tanh):
  one transcendental per gate, one elementwise pass. Its gradient is written
  out (``_lstm_core_bwd``) so that backprop keeps per step only the inputs and
  the [rows, 4 x hidden] tanh, not each gate and product that autodiff would
  save, and runs as two GEMMs and two elementwise passes.
  """
  # A state stored in a narrower type than the weights (bfloat16) is computed on in theirs.
  dtype = jnp.promote_types(state.h.dtype, params["w"].dtype)
  w, b = _prescaled(params, state.h.shape[-1], forget_bias, dtype)
  h, c = _lstm_core(w, b, x.astype(dtype), state.h.astype(dtype), state.c.astype(dtype))
  return LSTMState(h, c)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["layouts", "grad"], meta_fields=["kernel"])
@dataclasses.dataclass(frozen=True)
class LSTMStack:
  """Stacked LSTMs and their read-out, ready to run step after step (a pytree).

  The gate columns are pre-scaled (``_gate_affine``) here, once, rather than
  in every step, and the weights are laid out as each pass reads them
  (``layouts``). The gradient flows to other copies of the same weights:
  every matrix with its bias as last row, raveled into one vector, k times
  (``gradient_chunks``), so that in a loop of steps each copy collects the
  gradient of one share of the coordinates (on a GPU one kernel per step for
  the products and one for the accumulation) and the copies' gradients are
  summed once, after the loop. ``partial_sums`` gives them per matrix.
  """
  layouts: _Layouts
  grad: chex.Array   # [k, size]: per layer [fan_in + 1, 4 x hidden], then [hidden + 1, n_out]
  kernel: str = "xla"  # lstm_stack_prepare's ``kernel``

  def partial_sums(self) -> Tuple[Tuple[chex.Array, ...], chex.Array]:
    """``grad`` per matrix: (per layer [k, fan_in + 1, 4 x hidden], [k, hidden + 1, n_out])."""
    shapes = _grad_shapes(self.layouts)
    ends = np.cumsum([int(np.prod(s)) for s in shapes])
    k = self.grad.shape[0]
    parts = [a.reshape((k,) + s) for a, s in zip(jnp.split(self.grad, ends[:-1], axis=1), shapes)]
    return tuple(parts[:-1]), parts[-1]


def _grad_shapes(layouts: _Layouts) -> Tuple[Tuple[int, int], ...]:
  """[fan_in + 1, columns] of each matrix with its bias (the layers', the read-out's)."""
  return tuple((w.shape[0] + 1, w.shape[1]) for w in (*layouts.ws, layouts.w_out))


def lstm_stack_prepare(layers: Sequence[dict], readout: dict, forget_bias: float = 1.0,
                       kernel: str = "xla", gradient_chunks: int = 0) -> LSTMStack:
  """``LSTMStack`` of Sonnet-v1 LSTM ``layers`` (``lstm_init``) and a ``readout`` (``linear_init``).

  ``kernel``: how the passes run, the same function and gradient in all:
  "xla": XLA's ops; "pallas": where the program is compiled for a CUDA GPU,
  one fused Pallas kernel per step for the whole stack's forward pass and one
  for its backward pass (``lstm_kernel``; backprop then keeps only each
  step's inputs and recomputes the gates), elsewhere XLA's ops
  (``jax.lax.platform_dependent``); "pallas_forward": the fused forward
  kernel only (it also writes the gates for XLA's backward pass);
  "pallas_interpret": both fused kernels' programs interpreted on any backend
  (slow: for checking the kernels without a GPU).
  ``gradient_chunks``: partial sums of the weights' gradient (``LSTMStack``);
  0: ``default_gradient_chunks()``. The same gradient, up to float rounding; a
  loop differentiated under ``vmap`` over B optimizees holds B x chunks
  copies of the weights' gradient (L2O-DM: ~5,000 floats each), which for
  very many small optimizees may call for 1.
  """
  if kernel not in KERNELS:
    raise ValueError(f"lstm_stack_prepare: kernel={kernel!r}; allowed: {KERNELS}")
  check_gradient_chunks("lstm_stack_prepare", gradient_chunks)
  k = gradient_chunks or default_gradient_chunks()
  dtype = jnp.result_type(readout["w"])
  ws, bs = zip(*(_prescaled(p, p["w"].shape[1] // 4, forget_bias, dtype) for p in layers))
  w_out, b_out = readout["w"], readout["b"]
  padded = None
  if kernel != "xla":
    input_size = layers[0]["w"].shape[0] - layers[0]["w"].shape[1] // 4
    padded = lstm_kernel.pad_stack(ws, bs, w_out, b_out, input_size)
  layouts = _Layouts(tuple(ws), tuple(bs), w_out, b_out, tuple(w.T for w in ws), padded)
  flat = jnp.concatenate([jnp.concatenate([w, b[None]], axis=0).reshape(-1)
                          for w, b in zip((*ws, w_out), (*bs, b_out))])
  return LSTMStack(layouts, jnp.broadcast_to(flat, (k,) + flat.shape), kernel)


def lstm_stack_run(stack: LSTMStack, x: chex.Array, states: Sequence[LSTMState],
                   log_and_sign_of: Optional[Tuple[chex.Array, float]] = None
                   ) -> Tuple[chex.Array, Tuple[LSTMState, ...]]:
  """One step of a prepared stack: (read-out [rows, n_out], new states).

  The new states come in the dtypes of ``states``; a state stored narrower than
  the weights (bfloat16) is computed on in theirs. The fused kernels read and
  write such a state in its own dtype, and backprop keeps it so.
  ``log_and_sign_of``: (g, k) where ``x`` is ``preprocess.log_and_sign(g, k)``:
  the fused forward kernel then reads g and preprocesses it itself, so that
  nothing writes x for it (XLA's ops, and backprop's saved inputs, use x).
  """
  dtype = jnp.promote_types(states[0].h.dtype, stack.grad.dtype)
  cast = lambda a: a.astype(dtype)
  layouts = stack.layouts._replace(**{f: jax.tree_util.tree_map(cast, getattr(stack.layouts, f))
                                      for f in ("ws", "bs", "w_out", "b_out", "wts")})
  state_dtypes = {a.dtype for s in states for a in s}
  narrow = (stack.kernel != "xla" and len(state_dtypes) == 1
            and _narrow(states[0].h.dtype, dtype))
  as_computed = (lambda a: a) if narrow else cast
  g, k = (None, None) if log_and_sign_of is None else log_and_sign_of
  if g is not None and (g.shape != x.shape[:-1] or x.shape[-1] != 2):
    raise ValueError(f"lstm_stack_run: log_and_sign_of's gradient {g.shape} does not match "
                     f"x {x.shape} (its two features per row)")
  k = None if k is None else float(k)
  x, g, grad = cast(x), None if g is None else cast(g), cast(stack.grad)
  hs = tuple(as_computed(s.h) for s in states)
  cs = tuple(as_computed(s.c) for s in states)
  taped = None
  if stack.kernel in ("pallas", "pallas_interpret"):
    # In a residuals.taped_scan the saved inputs go on its tape, and the loop carries the
    # weights' gradient's running sum, which the fused kernel adds each step's to.
    saved = jax.eval_shape(_saved_inputs, x, hs, cs)
    accumulates = stack.grad.dtype == dtype

    def write(tape, slot, running_sum):
      return _taped_stack_core(stack.kernel, k, accumulates, layouts,
                               running_sum if accumulates else grad, x, g, hs, cs, tape, slot)

    taped = residuals.record(int(np.prod(saved.shape[:-1])), saved.shape[-1], saved.dtype,
                             write, accumulator=stack.grad if accumulates else None)
  out, hs, cs = (_stack_core(stack.kernel, k, layouts, grad, x, g, hs, cs) if taped is None
                 else taped)
  return out, tuple(LSTMState(h.astype(s.h.dtype), c.astype(s.c.dtype))
                    for h, c, s in zip(hs, cs, states))


def lstm_stack_apply(layers: Sequence[dict], x: chex.Array, states: Sequence[LSTMState],
                     readout: dict, forget_bias: float = 1.0, kernel: str = "xla",
                     gradient_chunks: int = 0) -> Tuple[chex.Array, Tuple[LSTMState, ...]]:
  """Stacked LSTMs (each layer's h is the next one's input), then a linear read-out.

  The same function as ``lstm_apply`` layer by layer and ``linear_apply`` on the
  last h, with one written-out gradient for the whole stack: per step, backprop
  keeps each layer's inputs and [rows, 4 x hidden] tanh, and recomputes the new
  h's that feed the next layer and the read-out instead of keeping them too
  (the following step keeps them as its recurrent state). Returns
  (read-out [rows, n_out], new states). A loop of steps should prepare the
  stack once (``lstm_stack_prepare``) and call ``lstm_stack_run`` per step.
  """
  return lstm_stack_run(lstm_stack_prepare(layers, readout, forget_bias, kernel,
                                           gradient_chunks), x, states)


def linear_init(key: chex.PRNGKey, input_size: int, output_size: int) -> dict:
  return {"w": truncated_normal(key, (input_size, output_size), input_size),
          "b": jnp.zeros((output_size,))}


def linear_apply(params: dict, x: chex.Array) -> chex.Array:
  return products.matmul(x, params["w"]) + params["b"]


def gru_init(key: chex.PRNGKey, input_size: int, hidden: int, scale: float = 0.5,
             gate_bias: float = 2.2) -> dict:
  """L2O-Scale's BiasGRUCell: weights N(0, (scale / sqrt(fan_in))^2), reset and
  update gate biases ``gate_bias`` (sigmoid(2.2) ~ 0.9: the state is kept by default)."""
  fan_in = input_size + hidden
  k_g, k_c = jax.random.split(key)
  std = scale / jnp.sqrt(fan_in)
  return {"w_gates": std * jax.random.normal(k_g, (fan_in, 2 * hidden)),
          "b_gates": jnp.full((2 * hidden,), gate_bias, jnp.float32),
          "w_cand": std * jax.random.normal(k_c, (fan_in, hidden)),
          "b_cand": jnp.zeros((hidden,))}


@jax.custom_vjp
def _gru_core(w_g, b_g, w_c, b_c, x, h, bias):
  return _gru_core_fwd(w_g, b_g, w_c, b_c, x, h, bias)[0]


def _gru_core_fwd(w_g, b_g, w_c, b_c, x, h, bias):
  hidden = h.shape[-1]
  gates = products.matmul(jnp.concatenate([x, h], axis=-1), w_g) + b_g + bias[..., :2 * hidden]
  ru = jax.nn.sigmoid(gates)
  r, u = jnp.split(ru, 2, axis=-1)
  c = jnp.tanh(products.matmul(jnp.concatenate([x, r * h], axis=-1), w_c) + b_c
               + bias[..., 2 * hidden:])
  # Saved for the backward pass: the inputs, the two gates and the candidate, as
  # two arrays (a loop of steps stacks each array in a kernel of its own, and
  # the inputs' can run before the step overwrites h in place).
  saved = (jnp.concatenate([x, h], axis=-1), jnp.concatenate([ru, c], axis=-1))
  return u * h + (1.0 - u) * c, (w_g, w_c, saved)


def _gru_core_bwd(res, dh_new):
  w_g, w_c, (xh, ruc) = res
  n_in = w_g.shape[0] - dh_new.shape[-1]
  x, h = xh[..., :n_in], xh[..., n_in:]
  r, u, c = jnp.split(ruc, 3, axis=-1)
  dzc = dh_new * (1.0 - u) * (1.0 - c * c)
  dxrh = products.matmul(dzc, w_c.T)
  drh = dxrh[..., n_in:]
  dg = jnp.concatenate([drh * h * r * (1.0 - r), dh_new * (h - c) * u * (1.0 - u)], axis=-1)
  dxh = products.matmul(dg, w_g.T)
  xh, xrh = jnp.concatenate([x, h], axis=-1), jnp.concatenate([x, r * h], axis=-1)
  dwb_g = products.summed_outer(products.with_ones(xh), dg)
  dwb_c = products.summed_outer(products.with_ones(xrh), dzc)
  dx = dxh[..., :n_in] + dxrh[..., :n_in]
  dh = dh_new * u + drh * r + dxh[..., n_in:]
  dbias = jnp.concatenate([dg, dzc], axis=-1)
  return (dwb_g[:-1], dwb_g[-1], dwb_c[:-1], dwb_c[-1], dx, dh, dbias)


_gru_core.defvjp(_gru_core_fwd, _gru_core_bwd)


def gru_apply(params: dict, x: chex.Array, h: chex.Array,
              bias: chex.Array | None = None) -> chex.Array:
  """GRU step with an optional injected bias ``[..., 3 * hidden]`` (reset, update, candidate).

  r, u = sigmoid([x, h] W_g + b_g + bias_{r,u}); c = tanh([x, r h] W_c + b_c + bias_c);
  h' = u h + (1 - u) c. The injected bias is how a higher level of a
  hierarchical RNN steers the level below it. The gradient is written out
  (``_gru_core_bwd``): backprop keeps per step the inputs, r, u and c.
  """
  full = h.shape[:-1] + (3 * h.shape[-1],)  # the core's bias has a row per row of h
  bias = jnp.zeros(full, h.dtype) if bias is None else jnp.broadcast_to(bias, full)
  return _gru_core(params["w_gates"], params["b_gates"], params["w_cand"], params["b_cand"],
                   x, h, bias)
