"""RNNProp on the MNIST MLP (784-20-10 sigmoid).

Everything but the model and its validation period is ``dm_mnist``'s, so the
curriculum / imitation switches there apply unchanged, and the same named
variants exist:

  python -m experiments.train --config=experiments/configs/rnnprop_mnist.py:rnnprop_cl_il

  rnnprop        plain RNNProp: 100 episodes of 100 steps (the paper's code's)
  rnnprop_cl_il  curriculum and imitation (RNNProp-CL-IL)
  rnnprop_aug, rnnprop_il, rnnprop_cl  as dm_mnist's dm_aug, dm_il, dm_cl

Data as in dm_mnist.py.
"""
import ml_collections

from experiments.configs import dm_mnist

FAMILY = "rnnprop"
VARIANTS = tuple(FAMILY + t for t in dm_mnist.TECHNIQUES)
NAMES = {v: "RNNProp" + t.upper().replace("_", "-") for v, t in zip(VARIANTS, dm_mnist.TECHNIQUES)}
# The paper's mean ln(training loss) at step 10,000 on MLP-orig (PAPER.md, "Claims").
PAPER_LN_LOSS_10K = {"rnnprop": -6.0, "rnnprop_cl_il": -10.5}


def get_config(variant: str = FAMILY) -> ml_collections.ConfigDict:
  suffix = dm_mnist.technique(FAMILY, variant, VARIANTS)
  c = dm_mnist.get_config("dm" + suffix)
  c.name = f"{variant}_mnist"
  # Adam moments (0.95, 0.95) in, Linear(2->20)+ELU, LSTM(20, 20), Linear(20->1), 0.01 x tanh
  c.model = ml_collections.ConfigDict({"name": "rnnprop", "options": {}})
  c.validation.period = 10  # the paper's code validates RNNProp every 10 episodes
  c.checkpoint_every = 10
  if suffix == "":
    c.meta.num_episodes = 100  # the paper's code: RNNProp alone needs few episodes
  return c
