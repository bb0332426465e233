"""The paper's two training techniques as config sections, both off by default.

  curriculum.enabled  steps per episode grow stage by stage (``schedule``);
                      stage i validates on stage i+1's length; after
                      ``min_num_eval`` validations without improvement the
                      stage's best is restored and the next stage starts (or
                      training stops when the stage never improved).
  imitation.enabled   an episode is an imitation episode with probability
                      ``ratios[stage]`` (with a curriculum) or ``ratio``
                      (without): the teacher moves the optimizee and the learned
                      optimizer is trained to reproduce its updates.
"""
import ml_collections

from l2ojax.meta.curriculum import PAPER_SCHEDULE

PAPER_IL_RATIOS = (0.0, 0.1, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3)


def add_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.curriculum = ml_collections.ConfigDict({
      "enabled": False,
      "schedule": PAPER_SCHEDULE,   # steps per episode by stage
      "min_num_eval": 3,            # validations without improvement before moving on
  })
  c.imitation = ml_collections.ConfigDict({
      "enabled": False,
      "teacher": "adam",            # adam (0.9, 0.999, 1e-8), rmsprop, nesterov
      "learning_rate": 0.01,
      "ratios": PAPER_IL_RATIOS,    # per stage, the last repeats (curriculum on)
      "ratio": 0.3,                 # curriculum off
      "k": 1,                       # teacher steps per label
      "separate_outer_state": True,  # own Adam state for imitation updates (the paper's)
  })
  # Validation score: "last" (mean loss at the last step, the paper's), "mean", "log_last".
  c.validation.score = "last"
  return c
