"""The paper's small convolutional nets (Conv-MNIST, Conv-CIFAR) as pure functions.

Layout (PAPER.md): conv k0 x k0 x c0 (stride s) + batch norm + ReLU + max-pool 2,
conv k1 x k1 x c1 (stride s) + batch norm + ReLU + max-pool 2, dense -> classes;
``mnist_conv`` uses stride 1, ``cifar_conv`` stride 2.

Batch normalisation uses the statistics of the minibatch inside the loss (no
running averages: the optimizee is only ever trained, never put in an
inference mode), so the loss stays a pure function of (params, instance, key).
Its scale and offset are ordinary leaves of ``params``: the learned optimizer
sees and updates them like every other parameter. Convolutions carry no bias,
the batch-norm offset plays that role.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import optax
from flax import struct

from l2ojax.optimizees import data as data_lib

BN_EPSILON = 1e-5


def batch_norm(x: chex.Array, scale: chex.Array, offset: chex.Array) -> chex.Array:
  """Normalises each channel of NHWC ``x`` by its minibatch mean and variance."""
  mean = jnp.mean(x, axis=(0, 1, 2))
  var = jnp.var(x, axis=(0, 1, 2))
  return (x - mean) * jax.lax.rsqrt(var + BN_EPSILON) * scale + offset


def max_pool2(x: chex.Array) -> chex.Array:
  """2 x 2 max-pooling, stride 2, SAME padding (odd sizes keep their last row)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "SAME")


@struct.dataclass
class ConvNet:
  """A softmax classifier convnet on an NHWC uint8 image set held on the device.

  ``relu_on_logits=True`` applies ReLU to the logits as the paper's code does
  (a defect: a class whose logit is negative can no longer be pushed down);
  keep it off except to reproduce the paper's figures.
  """

  images: chex.Array  # uint8 [N, H, W, C]
  labels: chex.Array  # int32 [N]
  channels: Tuple[int, ...] = struct.field(pytree_node=False, default=(16, 32))
  kernel_sizes: Tuple[int, ...] = struct.field(pytree_node=False, default=(3, 5))
  stride: int = struct.field(pytree_node=False, default=1)
  batch_size: int = struct.field(pytree_node=False, default=128)
  num_classes: int = struct.field(pytree_node=False, default=10)
  init_scale: float = struct.field(pytree_node=False, default=0.01)
  relu_on_logits: bool = struct.field(pytree_node=False, default=False)
  name: str = struct.field(pytree_node=False, default="mnist_conv")

  def _feature_size(self) -> int:
    h, w = self.images.shape[1:3]
    for _ in self.channels:
      h, w = -(-h // self.stride), -(-w // self.stride)  # SAME conv
      h, w = -(-h // 2), -(-w // 2)                      # SAME pool
    return h * w * self.channels[-1]

  def init(self, key: chex.PRNGKey) -> Tuple[dict, tuple]:
    """Conv and dense weights, dense bias N(0, init_scale^2); BN scale 1, offset 0."""
    keys = jax.random.split(key, len(self.channels) + 2)
    params, c_in = {}, self.images.shape[-1]
    for i, (c, k) in enumerate(zip(self.channels, self.kernel_sizes)):
      params[f"conv_{i}"] = {"w": self.init_scale * jax.random.normal(keys[i], (k, k, c_in, c))}
      params[f"bn_{i}"] = {"scale": jnp.ones((c,)), "offset": jnp.zeros((c,))}
      c_in = c
    d = self._feature_size()
    params["dense"] = {
        "w": self.init_scale * jax.random.normal(keys[-2], (d, self.num_classes)),
        "b": self.init_scale * jax.random.normal(keys[-1], (self.num_classes,)),
    }
    return params, ()

  def logits(self, params: dict, images: chex.Array) -> chex.Array:
    """Logits for a uint8 NHWC batch; normalisation to [0, 1] happens here."""
    x = images.astype(jnp.float32) / 255.0
    for i in range(len(self.channels)):
      x = jax.lax.conv_general_dilated(
          x, params[f"conv_{i}"]["w"], (self.stride, self.stride), "SAME",
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      bn = params[f"bn_{i}"]
      x = max_pool2(jax.nn.relu(batch_norm(x, bn["scale"], bn["offset"])))
    x = x.reshape(x.shape[0], -1) @ params["dense"]["w"] + params["dense"]["b"]
    return jax.nn.relu(x) if self.relu_on_logits else x

  def minibatch(self, key: chex.PRNGKey) -> chex.Array:
    """Indices of one minibatch, drawn with replacement."""
    return jax.random.randint(key, (self.batch_size,), 0, self.images.shape[0])

  def loss(self, params: dict, instance: tuple, key: chex.PRNGKey) -> chex.Array:
    return self.batch_loss(params, instance, self.minibatch(key))

  def batch_loss(self, params: dict, instance: tuple, idx: chex.Array) -> chex.Array:
    del instance  # members of the family differ only in their init
    logits = self.logits(params, self.images[idx])
    # one-hot rather than integer labels: its gradient is elementwise, not a scatter
    labels = jax.nn.one_hot(self.labels[idx], self.num_classes, dtype=logits.dtype)
    return optax.softmax_cross_entropy(logits, labels).mean()


def conv_net(dataset: str = "mnist", channels: Sequence[int] = (16, 32),
             kernel_sizes: Sequence[int] = (3, 5), stride: int = 1, batch_size: int = 128,
             init_scale: float = 0.01, relu_on_logits: bool = False, source: str = "auto",
             path: str = "", split: str = "test", data_dir: str = "",
             name: str = "mnist_conv") -> ConvNet:
  channels = tuple(int(c) for c in channels)
  kernel_sizes = tuple(int(k) for k in kernel_sizes)
  if not channels or len(channels) != len(kernel_sizes):
    raise ValueError(f"channels {channels} and kernel_sizes {kernel_sizes} must be non-empty "
                     f"and of the same length")
  if min(channels + kernel_sizes) < 1 or stride < 1 or batch_size < 1:
    raise ValueError(f"channels {channels}, kernel_sizes {kernel_sizes}, stride {stride} and "
                     f"batch_size {batch_size} must be >= 1")
  ds = data_lib.load(dataset, source=source, path=path, split=split, data_dir=data_dir)
  return ConvNet(images=jnp.asarray(ds.images), labels=jnp.asarray(ds.labels),
                 channels=channels, kernel_sizes=kernel_sizes, stride=int(stride),
                 batch_size=batch_size, init_scale=init_scale,
                 relu_on_logits=bool(relu_on_logits),
                 num_classes=int(ds.labels.max()) + 1 if ds.labels.size else 10, name=name)
