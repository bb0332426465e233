"""Small training configs shared by the tests."""
from experiments.configs import dm_quadratic


def tiny_quadratic(episodes: int = 6, checkpoint_every: int = 3, validation_period: int = 3):
  """L2O-DM on the quadratic family: 4 optimizees, 40-step episodes; seconds on a CPU."""
  c = dm_quadratic.get_config()
  c.meta.batch_size = 4
  c.meta.num_episodes = episodes
  c.meta.episode_steps = 40
  c.checkpoint_every = checkpoint_every
  c.validation.period = validation_period
  c.validation.num_optimizees = 4
  return c
