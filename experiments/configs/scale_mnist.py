"""L2O-Scale (hierarchical RNN) on the MNIST MLP (784-20-10 sigmoid).

Everything but the model and its meta-training recipe is ``dm_mnist``'s, so
the curriculum / imitation switches there apply unchanged (L2O-Scale-CL-IL).
The recipe is the original's: log-ratio meta-loss
mean(log(f_t / (f_0 + 1e-6) + 1e-6)), RMSProp at 1e-6, meta-gradient entries
clipped at 1e4 and non-finite entries zeroed. Data as in dm_mnist.py.
"""
import ml_collections

from experiments.configs import dm_mnist


def get_config() -> ml_collections.ConfigDict:
  c = dm_mnist.get_config()
  c.name = "scale_mnist"
  # cells (10, 20, 20), 4 momentum time scales, initial learning rates in 1e-6..1e-2
  c.model = ml_collections.ConfigDict({"name": "scale", "options": {}})
  c.meta.loss = "log_ratio"
  c.meta.optimizer = "rmsprop"
  c.meta.learning_rate = 1e-6
  c.meta.clip_value = 1e4
  c.meta.zero_nans = True
  return c
