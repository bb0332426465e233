"""L2O-DM on the paper's quadratic family: the built-in default, no download needed.

Sized to finish in a few minutes on a 2-core CPU.
"""
import ml_collections

from experiments.configs import techniques

ADAM_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "dm_quadratic"
  c.seed = 0
  # learning-to-learn's quadratic setting: raw gradients in, output scale 1.
  c.model = ml_collections.ConfigDict(
      {"name": "dm", "options": {"preprocessing": "identity", "scale": 1.0}})
  c.optimizee = ml_collections.ConfigDict({"name": "quadratic", "options": {}})
  c.data = ml_collections.ConfigDict(
      {"source": "auto", "path": "", "split": "test", "data_dir": ""})
  c.meta = ml_collections.ConfigDict({
      "batch_size": 32,          # B optimizees per meta-step (vmapped)
      "segment_length": 20,      # truncated-BPTT segment
      "episode_steps": 100,      # optimizee steps per episode
      "num_episodes": 300,
      "learning_rate": 1e-3,
      "optimizer": "adam",
      "clip_global_norm": 0.0,   # 0 = no clipping
      "loss": "sum",             # sum over t = 0..T (the paper's); mean, last, log_ratio
      "second_order": False,     # keep d(grad)/d(params) in the meta-gradient
  })
  c.validation = ml_collections.ConfigDict(
      {"period": 10, "num_optimizees": 64, "steps": 0})  # steps 0 = meta.episode_steps
  c.checkpoint_every = 25
  c.eval = ml_collections.ConfigDict({
      "num_optimizees": 64, "steps": 100, "seed": 12345,
      "adam_learning_rates": ADAM_LEARNING_RATES,
  })
  return techniques.add_defaults(c)
