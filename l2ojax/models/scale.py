"""L2O-Scale (Wichrowska et al. 2017): a hierarchical RNN optimizer.

Three recurrent levels, each a GRU whose gates take an injected bias from the
level above:

* per parameter (GRU, 10 units; one row per optimizee coordinate): its input
  is built from gradient momenta at ``num_scales`` time scales, each divided by
  its own running RMS and squashed with asinh, their neighbour products, the
  log mean-squares relative to their mean, and the coordinate's log learning
  rate relative to the problem's mean; the tensor and global states bias it;
* per tensor (GRU, 20 units; one row per leaf of the parameter pytree): its
  input is the mean over the tensor's coordinates of [new per-parameter state,
  per-parameter input]; the global state biases it;
* global (GRU, 20 units): its input is the mean of the new per-tensor states
  (and, with ``loss_input``, the log loss relative to the first loss seen).

Read-outs of the per-parameter state give the update direction (plus a linear
"shortcut" of the scaled momenta), normalised to unit RMS per tensor; a change
of the per-coordinate log learning rate (kept with momentum 0.96, clipped at
``max_log_lr`` with a straight-through gradient); and the decays used at the
next step for the momenta (the slowest three on 2, 4 and 8 times the
time scale of the fastest) and for the mean-squares. Learning rates start
log-uniform in ``init_lr_range`` (a per-coordinate draw plus a per-tensor
offset, as the original).

Simplifications and changes against the TensorFlow original (documented so
that results can be read against it):

* the global level averages the states of *all* tensors (the original passes
  only the last tensor's state, an oversight the paper's text does not share);
* no attention / Nesterov look-ahead (off in the paper's settings too);
* the initial learning rates are drawn from a fixed ``seed`` option, so
  ``init(params)`` stays a pure function of the parameters as optax expects
  (the original draws fresh ones per problem);
* ``loss_input`` (on by default) feeds log(|f_t|) - log(|f_first|) to the
  global level; its weights start at zero, so an untrained model computes
  exactly the original's function and meta-training decides whether to use
  it. The loss arrives the optax way: ``update(grads, state, params, value=loss)``.

The per-tensor level is over the leaves of whatever pytree the optimizer is
given; all coordinates are processed as one flat matrix (per-tensor means
are reductions over static slices of it), so the cost is one batched GRU over all
coordinates.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from l2ojax import products
from l2ojax.models import base, cells, residuals

# Initialisation constants of the original (its command-line defaults).
_GRU_SCALE = 0.5          # GRU weights N(0, (0.5 / sqrt(fan_in))^2)
_GATE_BIAS = 2.2          # reset/update gate bias: sigmoid(2.2) ~ 0.9
_READOUT_SCALE = 0.5      # read-out weights N(0, (0.5 / sqrt(cell size))^2)
_AFFINE_SCALE = 0.5       # the level-to-level bias projections
_SHORTCUT_SCALE = 0.1     # the momenta -> direction shortcut, N(1 / S, (0.1 / sqrt(S))^2)
_SCALE_DECAY_BIAS = 3.2   # mean-square decay starts at sigmoid(3.2) ~ 0.96
_INPUT_DECAY_BIAS = 2.2   # fastest momentum decay starts at sigmoid(2.2) ~ 0.9
_LR_MOMENTUM_LOGIT = 3.2  # log learning rate kept with momentum sigmoid(3.2) ~ 0.96
_STEPSIZE_OFFSET = -1.0   # step = exp(log_lr - 1) x direction
_MIN_LOG_LR = -33.0


class ScaleState(NamedTuple):
  """Everything L2O-Scale carries between steps; n coordinates, T tensors, S time scales."""
  param_h: chex.Array     # [n, p] per-parameter GRU state
  tensor_h: chex.Array    # [T, t] per-tensor GRU state
  global_h: chex.Array    # [g] global GRU state
  grad_accum: chex.Array  # [n, S] gradient momenta
  ms: chex.Array          # [n, S] running mean squares of the momenta
  scl_decay: chex.Array   # [n] decay of the mean squares, for the next step
  inp_decay: chex.Array   # [n] decay of the fastest momentum, for the next step
  log_lr: chex.Array      # [n] per-coordinate log learning rate
  first_loss: chex.Array  # [] loss at the first step (for ``loss_input``)
  count: chex.Array       # [] steps taken


def _affine_init(key: chex.PRNGKey, n_in: int, n_out: int, scale: float,
                 mean: float = 0.0) -> dict:
  return {"w": mean + scale / np.sqrt(n_in) * jax.random.normal(key, (n_in, n_out)),
          "b": jnp.zeros((n_out,))}


def _tensor_means(x: chex.Array, sizes: Tuple[int, ...]) -> chex.Array:
  """Mean over the coordinates of each tensor: [n, ...] -> [T, ...] (0 for an empty tensor).

  The tensors are contiguous runs of static length in the flat vector, so the means
  are slices and reductions rather than a segment sum: a scatter-add of thousands of
  rows onto a few contends on those rows on a GPU (and deterministic lowerings sort it).
  """
  rows, start = [], 0
  for size in sizes:
    rows.append(jnp.mean(x[start:start + size], axis=0) if size
                else jnp.zeros(x.shape[1:], x.dtype))
    start += size
  return jnp.stack(rows)


def _per_coordinate(t: chex.Array, sizes: Tuple[int, ...]) -> chex.Array:
  """Each tensor's row repeated over its coordinates: [T, ...] -> [n, ...] (no gather)."""
  return jnp.concatenate([jnp.broadcast_to(t[i], (size,) + t.shape[1:])
                          for i, size in enumerate(sizes) if size], axis=0)


def _structure(tree: chex.ArrayTree, who: str) -> Tuple[int, ...]:
  """Static number of coordinates of each leaf of a parameter pytree."""
  sizes = tuple(int(np.prod(np.shape(x))) for x in jax.tree_util.tree_leaves(tree))
  if not sizes or sum(sizes) == 0:
    raise ValueError(f"scale.{who}: the parameter pytree has no coordinates")
  return sizes


@dataclasses.dataclass(frozen=True)
class Scale:
  """The hierarchical RNN; ``level_sizes`` = (per parameter, per tensor, global)."""

  level_sizes: Tuple[int, int, int] = (10, 20, 20)
  num_scales: int = 4
  init_lr_range: Tuple[float, float] = (1e-6, 1e-2)
  max_log_lr: float = 33.0
  loss_input: bool = True
  seed: int = 0
  name: str = "scale"

  def __post_init__(self):
    if len(self.level_sizes) != 3 or any(int(s) < 1 for s in self.level_sizes):
      raise ValueError(f"scale: level_sizes must be 3 positive ints (parameter, tensor, "
                       f"global), got {self.level_sizes}")
    if self.num_scales < 2:
      raise ValueError(f"scale: num_scales must be >= 2, got {self.num_scales}")
    lo, hi = self.init_lr_range
    if not 0.0 < lo <= hi:
      raise ValueError(f"scale: init_lr_range must satisfy 0 < min <= max, got "
                       f"{self.init_lr_range}")

  def options(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("name")
    d["level_sizes"] = list(self.level_sizes)
    d["init_lr_range"] = list(self.init_lr_range)
    return d

  @property
  def num_features(self) -> int:
    """Per-parameter inputs: S scaled momenta, S - 1 products, S log mean-squares, 1 lr."""
    return 3 * self.num_scales

  def init(self, key: chex.PRNGKey) -> dict:
    p, t, g = self.level_sizes
    s, f = self.num_scales, self.num_features
    n_loss = int(self.loss_input)
    k = jax.random.split(key, 12)
    global_gru = cells.gru_init(k[3], t + n_loss, g, _GRU_SCALE, _GATE_BIAS)
    if self.loss_input:  # rows [t, t + 1) read the loss feature: start them at zero
      global_gru["w_gates"] = global_gru["w_gates"].at[t].set(0.0)
      global_gru["w_cand"] = global_gru["w_cand"].at[t].set(0.0)
    readout = lambda key, n_out=1: _READOUT_SCALE / np.sqrt(p) * jax.random.normal(key, (p, n_out))
    return {
        "init_state": {"param": jax.random.uniform(k[0], (p,), minval=-1.0, maxval=1.0),
                       "tensor": jax.random.uniform(k[1], (t,), minval=-1.0, maxval=1.0),
                       "global": jax.random.uniform(k[2], (g,), minval=-1.0, maxval=1.0)},
        "param_gru": cells.gru_init(k[4], f, p, _GRU_SCALE, _GATE_BIAS),
        "tensor_gru": cells.gru_init(k[5], p + f, t, _GRU_SCALE, _GATE_BIAS),
        "global_gru": global_gru,
        "tensor_to_param": _affine_init(k[6], t, 3 * p, _AFFINE_SCALE),
        "global_to_param": _affine_init(k[7], g, 3 * p, _AFFINE_SCALE),
        "global_to_tensor": _affine_init(k[8], g, 3 * t, _AFFINE_SCALE),
        "direction": readout(k[9]),
        "shortcut": _affine_init(k[10], s, 1, _SHORTCUT_SCALE, mean=1.0 / s)["w"],
        "scl_decay": {"w": readout(k[11]), "b": jnp.full((1,), _SCALE_DECAY_BIAS, jnp.float32)},
        "inp_decay": {"w": readout(jax.random.fold_in(k[11], 1)),
                      "b": jnp.full((1,), _INPUT_DECAY_BIAS, jnp.float32)},
        "lr": {"w": jnp.zeros((p, 1)), "b": jnp.zeros((1,))},
        "lr_momentum_logit": jnp.asarray(_LR_MOMENTUM_LOGIT, jnp.float32),
        "stepsize_offset": jnp.asarray(_STEPSIZE_OFFSET, jnp.float32),
    }

  def init_state(self, theta: dict, params: chex.ArrayTree) -> ScaleState:
    sizes = _structure(params, "init")
    flat, _ = ravel_pytree(params)
    n, num_tensors, dtype = flat.shape[0], len(sizes), flat.dtype
    lo, hi = np.log(self.init_lr_range[0]) / 2.0, np.log(self.init_lr_range[1]) / 2.0
    k_coord, k_tensor = jax.random.split(jax.random.PRNGKey(self.seed))
    log_lr = (jax.random.uniform(k_coord, (n,), minval=lo, maxval=hi)
              + _per_coordinate(jax.random.uniform(k_tensor, (num_tensors,), minval=lo,
                                                   maxval=hi), sizes))
    log_lr = jnp.clip(log_lr, _MIN_LOG_LR, self.max_log_lr)
    zeros_ns = jnp.zeros((n, self.num_scales), dtype)
    init = theta["init_state"]
    return ScaleState(
        param_h=jnp.broadcast_to(init["param"], (n, self.level_sizes[0])).astype(dtype),
        tensor_h=jnp.broadcast_to(init["tensor"], (num_tensors, self.level_sizes[1])).astype(dtype),
        global_h=init["global"].astype(dtype),
        grad_accum=zeros_ns, ms=zeros_ns,
        scl_decay=jnp.zeros((n,), dtype), inp_decay=jnp.zeros((n,), dtype),
        log_lr=log_lr.astype(dtype),
        first_loss=jnp.zeros((), jnp.float32), count=jnp.zeros((), jnp.int32))

  def _momenta(self, g: chex.Array, state: ScaleState
               ) -> Tuple[chex.Array, chex.Array, chex.Array]:
    """Momenta at S time scales, their mean squares, and the RMS-scaled momenta."""
    # decay_i = decay_0 ** (1 / 2^i): each momentum on twice the time scale of the
    # one before. The decay is exactly 0 at an episode's first step, where the
    # root's derivative is infinite: the double `where` keeps it out of the gradient.
    d0 = state.inp_decay[:, None]
    positive = d0 > 0
    powers = 0.5 ** jnp.arange(self.num_scales, dtype=d0.dtype)
    decay = jnp.where(positive, jnp.where(positive, d0, 1.0) ** powers, 0.0)
    accum = g[:, None] * (1.0 - decay) + state.grad_accum * decay
    sd = state.scl_decay[:, None]
    ms = (1.0 - sd) * (jnp.square(accum) + 1e-12) + sd * state.ms
    # a momentum beyond ~1.8e19 squares to inf in float32, and the features' log
    # mean-squares relative to their mean would be inf - inf: cap it (as Adam's
    # update stays finite there)
    ms = jnp.minimum(ms, jnp.finfo(ms.dtype).max)
    scaled = jnp.arcsinh(accum / jnp.sqrt(ms + 1e-16))
    return accum, ms, scaled

  def _features(self, scaled: chex.Array, ms: chex.Array, log_lr: chex.Array) -> chex.Array:
    products = scaled[:, :-1] * scaled[:, 1:]         # curvature relative to the time scale
    log_ms = jnp.log(ms + 1e-16)
    rel_log_ms = log_ms - jnp.mean(log_ms, axis=-1, keepdims=True)  # signal vs. noise
    rel_lr = log_lr - jnp.mean(log_lr)                 # this coordinate vs. the problem
    return jnp.concatenate([scaled, products, rel_log_ms, rel_lr[:, None]], axis=-1)

  def _loss_feature(self, value: Optional[chex.Array], state: ScaleState
                    ) -> Tuple[chex.Array, chex.Array]:
    if not self.loss_input:
      return jnp.zeros((0,), jnp.float32), state.first_loss
    if value is None:
      raise ValueError("scale.update: this model reads the loss (loss_input=True); call "
                       "tx.update(grads, state, params, value=loss), or build it with "
                       "loss_input=False")
    loss = jnp.asarray(value, jnp.float32)
    if loss.shape != ():
      raise ValueError(f"scale.update: value must be a scalar loss, got shape {loss.shape}")
    first = jnp.where(state.count == 0, loss, state.first_loss)
    rel = jnp.log(jnp.abs(loss) + 1e-12) - jnp.log(jnp.abs(first) + 1e-12)
    return jnp.clip(rel, -30.0, 30.0)[None], first

  def step(self, theta: dict, g: chex.Array, state: ScaleState, sizes: Tuple[int, ...],
           value: Optional[chex.Array] = None) -> Tuple[chex.Array, ScaleState]:
    """One step on the flat gradient ``g`` [n], made of tensors of ``sizes`` coordinates."""
    # elementwise from the step's inputs: recomputed in the backward pass rather than
    # a dozen [n, S] intermediates kept per step
    @jax.checkpoint
    def inputs(g, state):
      accum, ms, scaled = self._momenta(g, state)
      return accum, ms, scaled, self._features(scaled, ms, state.log_lr)

    accum, ms, scaled, x = inputs(g, state)

    # per parameter, steered by the tensor and global states of the previous step
    bias = (_per_coordinate(cells.linear_apply(theta["tensor_to_param"], state.tensor_h), sizes)
            + cells.linear_apply(theta["global_to_param"], state.global_h))
    param_h = cells.gru_apply(theta["param_gru"], x, state.param_h, bias)

    # per tensor: the mean of its coordinates' new states and inputs
    tensor_in = _tensor_means(jnp.concatenate([param_h, x], axis=-1), sizes)
    tensor_h = cells.gru_apply(theta["tensor_gru"], tensor_in, state.tensor_h,
                               cells.linear_apply(theta["global_to_tensor"], state.global_h))

    # global: the mean of the tensor states (and the loss relative to the first)
    loss_feat, first_loss = self._loss_feature(value, state)
    global_in = jnp.concatenate([jnp.mean(tensor_h, axis=0), loss_feat.astype(tensor_h.dtype)])
    global_h = cells.gru_apply(theta["global_gru"], global_in[None], state.global_h[None])[0]

    # read-outs: direction (unit RMS per tensor) x step size exp(log_lr - 1)
    # the four read-outs of the per-parameter state as one product
    readouts = products.rows_matmul(param_h, jnp.concatenate(
        [theta["direction"]] + [theta[k]["w"] for k in ("lr", "scl_decay", "inp_decay")], axis=1))
    direction = readouts[:, 0] + products.rows_matmul(scaled, theta["shortcut"])[:, 0]
    rms = jnp.sqrt(_tensor_means(jnp.square(direction), sizes) + 1e-16)
    direction = direction / _per_coordinate(rms, sizes)
    step_log_lr = state.log_lr + readouts[:, 1] + theta["lr"]["b"][0]
    # clip the value but pass the gradient of the unclipped one (as the original)
    step_log_lr = step_log_lr + jax.lax.stop_gradient(
        jnp.clip(step_log_lr, _MIN_LOG_LR, self.max_log_lr) - step_log_lr)
    lrm = jax.nn.sigmoid(theta["lr_momentum_logit"])
    new_state = ScaleState(
        param_h=param_h, tensor_h=tensor_h, global_h=global_h, grad_accum=accum, ms=ms,
        scl_decay=jax.nn.sigmoid(readouts[:, 2] + theta["scl_decay"]["b"][0]),
        inp_decay=jax.nn.sigmoid(readouts[:, 3] + theta["inp_decay"]["b"][0]),
        log_lr=lrm * state.log_lr + (1.0 - lrm) * step_log_lr,
        first_loss=first_loss, count=state.count + 1)
    update = -jnp.exp(step_log_lr + theta["stepsize_offset"]) * direction
    return update, new_state

  def transform(self, theta: dict) -> optax.GradientTransformationExtraArgs:
    base.check_theta(self, theta)
    # theta's gradient collected as one vector: a loop of steps then sums the
    # meta-gradient of its ~25 arrays in one accumulator, not one per array
    flat_theta = ravel_pytree(theta)[0]

    def init_fn(params):
      base.check_params(self.name, params)
      return self.init_state(theta, params)

    def update_fn(updates, state, params=None, *, value=None, **extra_args):
      del extra_args
      base.check_update_inputs(self.name, updates, params)
      sizes = _structure(updates, "update")
      flat_g, unravel = ravel_pytree(updates)
      if state.param_h.shape[0] != flat_g.shape[0] or state.tensor_h.shape[0] != len(sizes):
        raise ValueError(f"scale.update: gradients have {flat_g.shape[0]} coordinates in "
                         f"{len(sizes)} tensors, the optimizer state was made for "
                         f"{state.param_h.shape[0]} in {state.tensor_h.shape[0]}")
      step = residuals.packed(lambda flat, th, g, st, v: self.step(
          residuals.flat_gradient(flat, th), g, st, sizes, v))
      delta, new_state = step(flat_theta, theta, flat_g, state, value)
      # theta is float32: keep the state's dtypes whatever the gradients' dtype
      new_state = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), new_state, state)
      return unravel(delta.astype(flat_g.dtype)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale(**options: Any) -> Scale:
  """L2O-Scale; ``scale()`` is the paper's configuration (cells 10, 20, 20; 4 time scales)."""
  for field in ("level_sizes", "init_lr_range"):
    if field in options:
      options[field] = tuple(options[field])
  return Scale(**options)
