"""L2O-DM on the MNIST MLP (784-20-10 sigmoid), the paper's main setting, and
the paper's ablation of its two training techniques as named variants:

  python -m experiments.train --config=experiments/configs/dm_mnist.py:dm_cl_il

  dm        plain L2O-DM: 100 steps per episode, keep the best validation
  dm_aug    longer training only: 500 steps per episode, no curriculum
  dm_il     imitation only (ratio 0.3)
  dm_cl     curriculum only (100, 200, 500, ..., 3000 steps per episode)
  dm_cl_il  curriculum and imitation (per-stage ratios 0.0, 0.1, 0.3, ...)

The switches ``curriculum.enabled`` and ``imitation.enabled`` (and all their
fields, see l2ojax/meta/config.py) also work from the command line.

Data: MNIST via tensorflow-datasets, or offline
``--config.data.path=PATH/mnist10k.npz`` (uint8 images, int labels).
"""
import ml_collections

from experiments.configs import dm_quadratic

VARIANTS = ("dm", "dm_aug", "dm_il", "dm_cl", "dm_cl_il")
NAMES = {"dm": "DM", "dm_aug": "DM-AUG", "dm_il": "DM-IL", "dm_cl": "DM-CL", "dm_cl_il": "DM-CL-IL"}
# The paper's mean ln(training loss) at step 10,000 (read off its ablation plot).
PAPER_LN_LOSS_10K = {"dm": 0.0, "dm_aug": -3.0, "dm_il": -3.2, "dm_cl": -6.0, "dm_cl_il": -11.0}
TECHNIQUES = ("", "_aug", "_il", "_cl", "_cl_il")  # what each variant adds to the plain model


def technique(family: str, variant: str, variants) -> str:
  """The technique suffix of ``variant`` (e.g. "_cl_il" of "rnnprop_cl_il")."""
  if variant not in variants:
    raise ValueError(f"{family} variant {variant!r}; allowed: {tuple(variants)}")
  return variant[len(family):]


def get_config(variant: str = "dm") -> ml_collections.ConfigDict:
  suffix = technique("dm", variant, VARIANTS)
  c = dm_quadratic.get_config()
  c.name = f"{variant}_mnist"
  c.model = ml_collections.ConfigDict({"name": "dm", "options": {}})  # log/sign k=5, scale 0.01
  c.optimizee = ml_collections.ConfigDict(
      {"name": "mnist_mlp", "options": {"hidden_sizes": (20,), "activation": "sigmoid"}})
  c.meta.batch_size = 8
  c.meta.episode_steps = 500 if suffix == "_aug" else 100
  # learning-to-learn's 10,000 (a curriculum usually stops earlier); AUG: 5,000 of 500 steps
  c.meta.num_episodes = 5000 if suffix == "_aug" else 10000
  c.validation.period = 100
  c.validation.num_optimizees = 20
  c.checkpoint_every = 50
  c.curriculum.enabled = suffix in ("_cl", "_cl_il")
  c.imitation.enabled = suffix in ("_il", "_cl_il")
  c.eval.num_optimizees = 10
  c.eval.steps = 10000
  return c
