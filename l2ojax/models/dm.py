"""L2O-DM (Andrychowicz et al. 2016): a coordinatewise deep LSTM optimizer."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Tuple

import chex
import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from l2ojax.models import base, cells, preprocess


STATE_DTYPES = ("", "float32", "bfloat16")


class DMState(NamedTuple):
  """Recurrent state: one (h, c) per LSTM layer, rows = flattened coordinates."""
  lstm: Tuple[cells.LSTMState, ...]


@dataclasses.dataclass(frozen=True)
class DM:
  """Coordinatewise LSTM(s) -> Linear(hidden -> 1); update = scale x output.

  All parameter leaves are flattened into one coordinate vector, so the whole
  optimizee is one batched matmul per gate block rather than one per leaf.
  """

  hidden_sizes: Tuple[int, ...] = (20, 20)
  preprocessing: str = "log_and_sign"
  k: float = 5.0
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
  state_dtype: str = ""  # "" = the parameters' dtype; "bfloat16" halves the state's memory
  name: str = "dm"

  def __post_init__(self):
    if self.lstm_kernel not in cells.KERNELS:
      raise ValueError(f"dm: lstm_kernel={self.lstm_kernel!r}; allowed: {cells.KERNELS}")
    cells.check_gradient_chunks("dm", self.gradient_chunks)
    if self.preprocessing not in preprocess.PREPROCESSORS:
      raise ValueError(f"dm: preprocessing={self.preprocessing!r}; allowed: "
                       f"{sorted(preprocess.PREPROCESSORS)}")
    if self.state_dtype not in STATE_DTYPES:
      raise ValueError(f"dm: state_dtype={self.state_dtype!r}; allowed: {STATE_DTYPES}")
    if not self.hidden_sizes or any(h < 1 for h in self.hidden_sizes):
      raise ValueError(f"dm: hidden_sizes must be non-empty positive ints, got {self.hidden_sizes}")

  def for_meta_batch(self, batch_size: int, num_coordinates: int) -> "DM":
    """This optimizer as a meta-step over ``batch_size`` optimizees of ``num_coordinates``
    each should run it (``cells.auto_gradient_chunks``): the same function and gradient."""
    return dataclasses.replace(self, gradient_chunks=cells.auto_gradient_chunks(
        self.lstm_kernel, self.gradient_chunks, batch_size, num_coordinates))

  def options(self) -> Dict[str, Any]:
    d = dataclasses.asdict(self)
    d.pop("name")
    d["hidden_sizes"] = list(self.hidden_sizes)
    return d

  @property
  def _num_inputs(self) -> int:
    return 2 if self.preprocessing == "log_and_sign" else 1

  def init(self, key: chex.PRNGKey) -> dict:
    keys = jax.random.split(key, len(self.hidden_sizes) + 1)
    theta, n_in = {}, self._num_inputs
    for i, h in enumerate(self.hidden_sizes):
      theta[f"lstm_{i}"] = cells.lstm_init(keys[i], n_in, h)
      n_in = h
    theta["linear"] = cells.linear_init(keys[-1], n_in, 1)
    return theta

  def _features(self, g: chex.Array) -> chex.Array:
    if self.preprocessing == "log_and_sign":
      return preprocess.log_and_sign(g, self.k)
    return preprocess.identity(g)

  def prepare(self, theta: dict) -> cells.LSTMStack:
    """The network of ``theta`` ready to run step after step (``cells.lstm_stack_prepare``)."""
    layers = [theta[f"lstm_{i}"] for i in range(len(self.hidden_sizes))]
    return cells.lstm_stack_prepare(layers, theta["linear"], self.forget_bias, self.lstm_kernel,
                                    self.gradient_chunks)

  def step(self, theta: dict | cells.LSTMStack, g: chex.Array, state: DMState
           ) -> Tuple[chex.Array, DMState]:
    """One coordinatewise step on a flat gradient vector ``g`` [n] -> update [n].

    ``theta``: the meta-parameters, or ``prepare(theta)`` (what ``transform`` does,
    once, rather than in every step).
    """
    stack = theta if isinstance(theta, cells.LSTMStack) else self.prepare(theta)
    # the fused forward kernel preprocesses g itself (no launch of its own for x)
    fused_input = (g, self.k) if self.preprocessing == "log_and_sign" else None
    out, new_states = cells.lstm_stack_run(stack, self._features(g), state.lstm, fused_input)
    return self.scale * out[:, 0], DMState(new_states)

  def init_state(self, params: chex.ArrayTree) -> DMState:
    flat, _ = ravel_pytree(params)
    dtype = jnp.dtype(self.state_dtype) if self.state_dtype else flat.dtype
    return DMState(tuple(cells.lstm_zero_state(flat.shape[0], h, dtype)
                         for h in self.hidden_sizes))

  def transform(self, theta: dict) -> optax.GradientTransformationExtraArgs:
    base.check_theta(self, theta)
    stack = self.prepare(theta)

    def init_fn(params):
      base.check_params(self.name, params)
      return self.init_state(params)

    def update_fn(updates, state, params=None, **extra_args):
      del extra_args
      base.check_update_inputs(self.name, updates, params)
      flat_g, unravel = ravel_pytree(updates)
      if state.lstm[0].h.shape[0] != flat_g.shape[0]:
        raise ValueError(f"dm.update: gradients have {flat_g.shape[0]} coordinates, "
                         f"the optimizer state was made for {state.lstm[0].h.shape[0]}")
      delta, new_state = self.step(stack, flat_g, state)
      # theta is float32: keep the params' and the state's dtypes whatever they are
      new_state = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), new_state, state)
      return unravel(delta.astype(flat_g.dtype)), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def dm(**options: Any) -> DM:
  """L2O-DM; ``dm()`` is the paper's MNIST configuration, ``dm(preprocessing="identity",
  scale=1.0)`` its quadratic one."""
  if "hidden_sizes" in options:
    options["hidden_sizes"] = tuple(options["hidden_sizes"])
  return DM(**options)
