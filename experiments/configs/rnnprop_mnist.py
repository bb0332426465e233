"""RNNProp on the MNIST MLP (784-20-10 sigmoid).

Everything but the model is ``dm_mnist``'s, so the curriculum / imitation
switches there apply unchanged (RNNProp-CL-IL). Data as in dm_mnist.py.
"""
import ml_collections

from experiments.configs import dm_mnist


def get_config() -> ml_collections.ConfigDict:
  c = dm_mnist.get_config()
  c.name = "rnnprop_mnist"
  # Adam moments (0.95, 0.95) in, Linear(2->20)+ELU, LSTM(20, 20), Linear(20->1), 0.01 x tanh
  c.model = ml_collections.ConfigDict({"name": "rnnprop", "options": {}})
  return c
