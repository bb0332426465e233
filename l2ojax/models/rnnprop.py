"""RNNProp (Lv, Chen & Song 2017): a coordinatewise LSTM fed with Adam's statistics.

Instead of the raw gradient, the network sees two scale-free inputs built from
bias-corrected Adam moments (beta1 = beta2 = 0.95),

    m_hat / (sqrt(v_hat) + eps)   and   g / (sqrt(v_hat) + eps),

so one network serves coordinates whose gradients differ by orders of
magnitude. The moments live in the optimizer state and are updated from
whatever gradient ``update`` receives: under imitation learning that is the
teacher's gradient, so the statistics follow the teacher with no extra code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Tuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from l2ojax import products
from l2ojax.models import base, cells, residuals


class RNNPropState(NamedTuple):
  """Adam moments and LSTM states over the flattened coordinates."""
  count: chex.Array                      # steps taken, for the bias correction
  mu: chex.Array                         # [n] first moment
  nu: chex.Array                         # [n] second moment
  lstm: Tuple[cells.LSTMState, ...]      # one (h, c) per LSTM layer, rows = coordinates


@dataclasses.dataclass(frozen=True)
class RNNProp:
  """Linear(2 -> input_size) + ELU -> LSTM(s) -> Linear(hidden -> 1) -> scale x tanh.

  The default two LSTM layers of 20 follow the paper's code ("LSTM(20, 20)");
  ``hidden_sizes=(20,)`` gives a single layer.
  """

  hidden_sizes: Tuple[int, ...] = (20, 20)
  input_size: int = 20
  beta1: float = 0.95
  beta2: float = 0.95
  eps: float = 1e-8
  scale: float = 0.01
  forget_bias: float = 1.0
  # "pallas": on a GPU, the LSTM stack's forward and backward passes as one fused
  # kernel each per step: the same function and gradient with fewer kernels and
  # memory passes; "pallas_forward": the forward kernel only (cells.lstm_stack_prepare)
  lstm_kernel: str = "xla"
  # partial sums of the LSTM weights' gradient in a loop of steps; 0: chosen by the
  # meta-step for its batch with the fused kernels on a GPU (for_meta_batch), else 64
  # on a GPU, 1 elsewhere (cells.lstm_stack_prepare)
  gradient_chunks: int = 0
  name: str = "rnnprop"

  def __post_init__(self):
    if self.lstm_kernel not in cells.KERNELS:
      raise ValueError(f"rnnprop: lstm_kernel={self.lstm_kernel!r}; allowed: {cells.KERNELS}")
    cells.check_gradient_chunks("rnnprop", self.gradient_chunks)
    if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
      raise ValueError(f"rnnprop: hidden_sizes must be non-empty positive ints, "
                       f"got {self.hidden_sizes}")
    if self.input_size < 1:
      raise ValueError(f"rnnprop: input_size must be >= 1, got {self.input_size}")
    for field in ("beta1", "beta2"):
      if not 0.0 <= getattr(self, field) < 1.0:
        raise ValueError(f"rnnprop: {field} must be in [0, 1), got {getattr(self, field)}")

  def for_meta_batch(self, batch_size: int, num_coordinates: int) -> "RNNProp":
    """This optimizer as a meta-step over ``batch_size`` optimizees of ``num_coordinates``
    each should run it (``cells.auto_gradient_chunks``): the same function and gradient."""
    return dataclasses.replace(self, gradient_chunks=cells.auto_gradient_chunks(
        self.lstm_kernel, self.gradient_chunks, batch_size, num_coordinates))

  def options(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("name")
    d["hidden_sizes"] = list(self.hidden_sizes)
    return d

  def init(self, key: chex.PRNGKey) -> dict:
    keys = jax.random.split(key, len(self.hidden_sizes) + 2)
    theta = {"input": cells.linear_init(keys[0], 2, self.input_size)}
    n_in = self.input_size
    for i, h in enumerate(self.hidden_sizes):
      theta[f"lstm_{i}"] = cells.lstm_init(keys[i + 1], n_in, h)
      n_in = h
    theta["linear"] = cells.linear_init(keys[-1], n_in, 1)
    return theta

  def init_state(self, params: chex.ArrayTree) -> RNNPropState:
    flat, _ = ravel_pytree(params)
    n, dtype = flat.shape[0], flat.dtype
    return RNNPropState(jnp.zeros((), jnp.int32), jnp.zeros((n,), dtype), jnp.zeros((n,), dtype),
                        tuple(cells.lstm_zero_state(n, h, dtype) for h in self.hidden_sizes))

  def features(self, g: chex.Array, state: RNNPropState
               ) -> Tuple[chex.Array, Tuple[chex.Array, chex.Array, chex.Array]]:
    """Updates the moments with ``g`` and returns the inputs [n, 2] and new (count, mu, nu)."""
    count = state.count + 1
    mu = self.beta1 * state.mu + (1.0 - self.beta1) * g
    nu = self.beta2 * state.nu + (1.0 - self.beta2) * jnp.square(g)
    # a gradient beyond ~1.8e19 squares to inf in float32; capped, the moment decays
    # back once the gradients do (at inf, as Adam's would, it would stay there)
    nu = jnp.minimum(nu, jnp.finfo(nu.dtype).max)
    t = count.astype(g.dtype)
    mu_hat = mu / (1.0 - self.beta1 ** t)
    nu_hat = nu / (1.0 - self.beta2 ** t)
    denom = jnp.sqrt(nu_hat) + self.eps
    return jnp.stack([mu_hat / denom, g / denom], axis=-1), (count, mu, nu)

  def prepare(self, theta: dict) -> Tuple[dict, cells.LSTMStack]:
    """(input layer, LSTM stack) of ``theta`` ready to run step after step."""
    layers = [theta[f"lstm_{i}"] for i in range(len(self.hidden_sizes))]
    return theta["input"], cells.lstm_stack_prepare(layers, theta["linear"], self.forget_bias,
                                                    self.lstm_kernel, self.gradient_chunks)

  def step(self, theta: dict | Tuple[dict, cells.LSTMStack], g: chex.Array,
           state: RNNPropState) -> Tuple[chex.Array, RNNPropState]:
    """One coordinatewise step on a flat gradient ``g`` [n] -> update [n].

    ``theta``: the meta-parameters, or ``prepare(theta)`` (what ``transform`` does,
    once, rather than in every step).
    """
    input_layer, stack = theta if isinstance(theta, tuple) else self.prepare(theta)
    x, (count, mu, nu) = self.features(g, state)
    x = jax.nn.elu(products.rows_linear(x, input_layer["w"], input_layer["b"]))
    out, new_lstm = cells.lstm_stack_run(stack, x, state.lstm)
    return self.scale * jnp.tanh(out[:, 0]), RNNPropState(count, mu, nu, new_lstm)

  def transform(self, theta: dict) -> optax.GradientTransformationExtraArgs:
    base.check_theta(self, theta)
    input_layer, stack = self.prepare(theta)
    # the input layer's gradient collected as one vector (a loop of steps sums one
    # accumulator for it, not one per array; the stack's is one already)
    flat_input = ravel_pytree(input_layer)[0]

    def init_fn(params):
      base.check_params(self.name, params)
      return self.init_state(params)

    def update_fn(updates, state, params=None, **extra_args):
      del extra_args
      base.check_update_inputs(self.name, updates, params)
      flat_g, unravel = ravel_pytree(updates)
      if state.mu.shape[0] != flat_g.shape[0]:
        raise ValueError(f"rnnprop.update: gradients have {flat_g.shape[0]} coordinates, "
                         f"the optimizer state was made for {state.mu.shape[0]}")
      delta, new_state = self.step(
          (residuals.flat_gradient(flat_input, input_layer), stack), flat_g, state)
      # theta is float32: keep the state's dtypes whatever the gradients' dtype
      new_state = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), new_state, state)
      return unravel(delta.astype(flat_g.dtype)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rnnprop(**options: Any) -> RNNProp:
  """RNNProp; ``rnnprop()`` is the paper's configuration."""
  if "hidden_sizes" in options:
    options["hidden_sizes"] = tuple(options["hidden_sizes"])
  return RNNProp(**options)
