"""Multi-layer perceptrons on an image data set held on the device."""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree

from l2ojax import gpu, products
from l2ojax.optimizees import data as data_lib
from l2ojax.optimizees import mlp_kernel

ACTIVATIONS = {"sigmoid": jax.nn.sigmoid, "relu": jax.nn.relu, "tanh": jnp.tanh}

# Whether ``batch_loss``'s layers take their biases' gradients from the weights'
# product (``products.rows_linear``) instead of autodiff's sum over the minibatch: as
# compiled for a GPU at B = 1 (XLA's MLP), XLA fuses that small reduction into each of
# three kernels that read the gradient, each summing it again serially (BENCHMARKS.md);
# from the product, once, at the cost of a kernel writing [x, 1]. Read when the loss is
# traced (the benchmark's --kernel_constant=mlp.BIAS_IN_PRODUCT=1). Not yet timed.
BIAS_IN_PRODUCT = False


@struct.dataclass
class MLP:
  """A softmax classifier MLP; minibatches are drawn with replacement in the loss.

  The images (uint8, [N, D]) and labels are pytree leaves, so a jitted step
  takes them as device arguments rather than baking them in as constants.
  ``kernel``: how ``batch_value_and_grad`` computes a step's loss and gradient
  (``mlp_kernel``; one hidden layer only): "xla" (autodiff of ``batch_loss``),
  "pallas" (one fused kernel where the program is compiled for a GPU, XLA's
  ops elsewhere) or "pallas_interpret".
  """

  images: chex.Array
  labels: chex.Array
  hidden_sizes: Tuple[int, ...] = struct.field(pytree_node=False, default=(20,))
  activation: str = struct.field(pytree_node=False, default="sigmoid")
  batch_size: int = struct.field(pytree_node=False, default=128)
  num_classes: int = struct.field(pytree_node=False, default=10)
  init_scale: float = struct.field(pytree_node=False, default=0.01)
  name: str = struct.field(pytree_node=False, default="mnist_mlp")
  kernel: str = struct.field(pytree_node=False, default="xla")

  def init(self, key: chex.PRNGKey) -> Tuple[dict, tuple]:
    sizes = (self.images.shape[-1],) + tuple(self.hidden_sizes) + (self.num_classes,)
    params = {}
    keys = jax.random.split(key, 2 * (len(sizes) - 1))
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      # learning-to-learn's MNIST problem: weights and biases both N(0, 0.01^2).
      params[f"layer_{i}"] = {
          "w": self.init_scale * jax.random.normal(keys[2 * i], (fan_in, fan_out)),
          "b": self.init_scale * jax.random.normal(keys[2 * i + 1], (fan_out,)),
      }
    return params, ()

  def minibatch(self, key: chex.PRNGKey) -> chex.Array:
    """Indices of one minibatch, drawn with replacement."""
    return jax.random.randint(key, (self.batch_size,), 0, self.images.shape[0])

  def loss(self, params: dict, instance: tuple, key: chex.PRNGKey) -> chex.Array:
    return self.batch_loss(params, instance, self.minibatch(key))

  def batch_loss(self, params: dict, instance: tuple, idx: chex.Array) -> chex.Array:
    del instance  # members of the family differ only in their init
    x = self.images[idx].astype(jnp.float32) / 255.0
    act = ACTIVATIONS[self.activation]
    n = len(params)
    for i in range(n):
      layer = params[f"layer_{i}"]
      x = (products.rows_linear(x, layer["w"], layer["b"]) if BIAS_IN_PRODUCT
           else x @ layer["w"] + layer["b"])
      if i < n - 1:
        x = act(x)
    # one-hot rather than integer labels: its gradient is elementwise, not a scatter
    labels = jax.nn.one_hot(self.labels[idx], self.num_classes, dtype=x.dtype)
    return optax.softmax_cross_entropy(x, labels).mean()

  def batch_value_and_grad(self, params: dict, instance: tuple,
                           idx: chex.Array) -> Tuple[chex.Array, dict]:
    """``jax.value_and_grad(batch_loss)``, by ``kernel``."""
    xla = jax.value_and_grad(self.batch_loss)
    if self.kernel == "xla":
      return xla(params, instance, idx)

    def fused(params, instance, idx):
      del instance
      loss, grad = mlp_kernel.value_and_grad(
          self.images, self.labels, idx, mlp_kernel.pieces(params),
          mlp_kernel.layout(params, flat=False), self.activation,
          interpret=self.kernel == "pallas_interpret")
      flat, unravel = ravel_pytree(params)
      return loss, unravel(grad.astype(flat.dtype))

    return gpu.on_gpu(self.kernel, fused, xla, params, instance, idx)

  def flat_batch_value_and_grad(self, flat: chex.Array, unravel: Callable, instance: tuple,
                                idx: chex.Array) -> Tuple[chex.Array, chex.Array]:
    """``batch_value_and_grad`` of ``unravel(flat)``, the gradient raveled like ``flat``:
    for an unroll that carries the parameters as one vector (the fused kernel then
    reads and writes that vector, not its slices)."""
    xla = jax.value_and_grad(lambda f, inst, i: self.batch_loss(unravel(f), inst, i))
    if self.kernel == "xla":
      return xla(flat, instance, idx)

    def fused(flat, instance, idx):
      del instance
      loss, grad = mlp_kernel.value_and_grad(
          self.images, self.labels, idx, (flat,), mlp_kernel.layout(unravel(flat), flat=True),
          self.activation, interpret=self.kernel == "pallas_interpret")
      return loss, grad.astype(flat.dtype)

    return gpu.on_gpu(self.kernel, fused, xla, flat, instance, idx)


def mlp(dataset: str = "mnist", hidden_sizes: Sequence[int] = (20,), activation: str = "sigmoid",
        batch_size: int = 128, init_scale: float = 0.01, source: str = "auto", path: str = "",
        split: str = "test", data_dir: str = "", name: str = "mnist_mlp",
        kernel: str = "xla") -> MLP:
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation={activation!r}; allowed: {sorted(ACTIVATIONS)}")
  hidden_sizes = tuple(int(h) for h in hidden_sizes)
  if any(h < 1 for h in hidden_sizes) or batch_size < 1:
    raise ValueError(f"hidden_sizes {hidden_sizes} and batch_size {batch_size} must be >= 1")
  ds = data_lib.load(dataset, source=source, path=path, split=split, data_dir=data_dir)
  images = jnp.asarray(ds.images.reshape(ds.images.shape[0], -1))
  num_classes = int(ds.labels.max()) + 1 if ds.labels.size else 10
  if kernel != "xla":
    mlp_kernel.check_sizes(kernel, hidden_sizes, batch_size, num_classes)
  return MLP(images=images, labels=jnp.asarray(ds.labels), hidden_sizes=hidden_sizes,
             activation=activation, batch_size=batch_size, init_scale=init_scale,
             num_classes=num_classes, name=name, kernel=kernel)
