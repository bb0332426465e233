"""L2O-Scale (hierarchical RNN) on the MNIST MLP (784-20-10 sigmoid).

Everything but the model and its meta-training recipe is ``dm_mnist``'s, so
the curriculum / imitation switches there apply unchanged, and the same named
variants exist (``scale``, ``scale_cl_il``, ``scale_aug``, ``scale_il``,
``scale_cl``):

  python -m experiments.train --config=experiments/configs/scale_mnist.py:scale_cl_il

The recipe is the original's: log-ratio meta-loss
mean(log(f_t / (f_0 + 1e-6) + 1e-6)), RMSProp at 1e-6, meta-gradient entries
clipped at 1e4 and non-finite entries zeroed; its curriculum goes on to 5,000
steps per episode. Data as in dm_mnist.py.
"""
import ml_collections

from experiments.configs import dm_mnist

FAMILY = "scale"
VARIANTS = tuple(FAMILY + t for t in dm_mnist.TECHNIQUES)
NAMES = {v: "L2O-Scale" + t.upper().replace("_", "-")
         for v, t in zip(VARIANTS, dm_mnist.TECHNIQUES)}
# The paper's mean ln(training loss) at step 10,000 on MLP-orig (PAPER.md, "Claims").
PAPER_LN_LOSS_10K = {"scale": -1.0, "scale_cl_il": -1.8}


def get_config(variant: str = FAMILY) -> ml_collections.ConfigDict:
  suffix = dm_mnist.technique(FAMILY, variant, VARIANTS)
  c = dm_mnist.get_config("dm" + suffix)
  c.name = f"{variant}_mnist"
  # cells (10, 20, 20), 4 momentum time scales, initial learning rates in 1e-6..1e-2
  c.model = ml_collections.ConfigDict({"name": "scale", "options": {}})
  c.meta.loss = "log_ratio"
  c.meta.optimizer = "rmsprop"
  c.meta.learning_rate = 1e-6
  c.meta.clip_value = 1e4
  c.meta.zero_nans = True
  c.curriculum.schedule = tuple(c.curriculum.schedule) + (3500, 4000, 4500, 5000)
  return c
