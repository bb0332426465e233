"""L2O-DM on the MNIST MLP (784-20-10 sigmoid), the paper's main setting.

Data: MNIST via tensorflow-datasets, or offline
``--config.data.path=PATH/mnist10k.npz`` (uint8 images, int labels).
"""
import ml_collections

from experiments.configs import dm_quadratic


def get_config() -> ml_collections.ConfigDict:
  c = dm_quadratic.get_config()
  c.name = "dm_mnist"
  c.model = ml_collections.ConfigDict({"name": "dm", "options": {}})  # log/sign k=5, scale 0.01
  c.optimizee = ml_collections.ConfigDict(
      {"name": "mnist_mlp", "options": {"hidden_sizes": (20,), "activation": "sigmoid"}})
  c.meta.batch_size = 8
  c.meta.num_episodes = 1000
  c.validation.period = 100
  c.validation.num_optimizees = 20
  c.checkpoint_every = 50
  c.eval.num_optimizees = 10
  c.eval.steps = 1000
  return c
