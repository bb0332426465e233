"""Curriculum learning: a schedule of episode lengths and the controller that
walks it from validation scores.

Plain Python between jitted steps: the controller only ever sees one float per
validation, so it is unit-testable on scripted scores and never retraces
anything. Stage i trains on ``schedule[i]`` steps per episode and validates on
``schedule[i + 1]`` (the last stage on its own length; the paper's code crashes
there).
"""
from __future__ import annotations

import dataclasses
import enum
import math
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import chex
import numpy as np

PAPER_SCHEDULE = (100, 200, 500, 1000, 1500, 2000, 2500, 3000)


class CurriculumState(NamedTuple):
  """What the controller remembers; all of it goes into the checkpoint."""
  stage: int
  best_score: float   # the stage's best validation score (re-scored on advancing)
  patience: int       # validations since the stage last improved
  improved: bool      # the stage has improved at least once
  done: bool          # training is over


class Decision(str, enum.Enum):
  IMPROVED = "improved"   # save the stage's best
  WAIT = "wait"           # no improvement yet, patience left
  ADVANCE = "advance"     # restore the stage's best, move on, re-score at the new length
  STOP = "stop"           # a whole stage brought no improvement: restore the best, end
  COMPLETE = "complete"   # the last stage has run out of patience: restore the best, end


@dataclasses.dataclass(frozen=True)
class Curriculum:
  """Steps per episode by stage, and when to move on.

  ``min_num_eval=None`` never advances nor stops: one stage that only keeps its
  best, which is training without a curriculum.
  """

  schedule: Tuple[int, ...] = PAPER_SCHEDULE
  min_num_eval: Optional[int] = 3

  def __post_init__(self):
    if not self.schedule or any(int(s) < 1 for s in self.schedule):
      raise ValueError(f"curriculum.schedule must be non-empty positive ints, got {self.schedule}")
    if self.min_num_eval is not None and self.min_num_eval < 1:
      raise ValueError(f"curriculum.min_num_eval must be >= 1, got {self.min_num_eval}")

  @property
  def num_stages(self) -> int:
    return len(self.schedule)

  def episode_steps(self, stage: int) -> int:
    return int(self.schedule[stage])

  def validation_steps(self, stage: int) -> int:
    """The next stage's length; the last stage validates on its own."""
    return int(self.schedule[min(stage + 1, self.num_stages - 1)])

  def init(self) -> CurriculumState:
    return CurriculumState(stage=0, best_score=math.inf, patience=0, improved=False, done=False)

  def observe(self, state: CurriculumState, score: float
              ) -> Tuple[CurriculumState, Decision]:
    """One validation score in; the new state and what the trainer must do.

    A non-finite score never counts as an improvement.
    """
    if state.done:
      raise ValueError("curriculum.observe: training is already done")
    if math.isfinite(score) and score < state.best_score:
      return state._replace(best_score=float(score), patience=0, improved=True), Decision.IMPROVED
    state = state._replace(patience=state.patience + 1)
    if self.min_num_eval is None or state.patience < self.min_num_eval:
      return state, Decision.WAIT
    if not state.improved:
      return state._replace(done=True), Decision.STOP
    if state.stage + 1 >= self.num_stages:
      return state._replace(done=True), Decision.COMPLETE
    return state, Decision.ADVANCE

  def advance(self, state: CurriculumState, rescored: float) -> CurriculumState:
    """After ADVANCE: the next stage starts from the restored best, whose score at
    the new validation length is ``rescored``."""
    if state.stage + 1 >= self.num_stages:
      raise ValueError(f"curriculum.advance: stage {state.stage} is the last")
    best = float(rescored) if math.isfinite(rescored) else math.inf
    return CurriculumState(stage=state.stage + 1, best_score=best, patience=0, improved=False,
                           done=False)


def stage_value(values: Sequence[float], stage: int) -> float:
  """``values[stage]``, the last value repeating for later stages (per-stage ratios)."""
  if not len(values):
    raise ValueError("per-stage values must be non-empty")
  return float(values[min(stage, len(values) - 1)])


def _last(losses: np.ndarray) -> float:
  return float(np.mean(losses[:, -1]))


def _mean(losses: np.ndarray) -> float:
  return float(np.mean(losses))


def _log_last(losses: np.ndarray) -> float:
  return float(np.mean(np.log(losses[:, -1])))


SCORES: Dict[str, Callable[[np.ndarray], float]] = {
    "last": _last, "mean": _mean, "log_last": _log_last,
}


def score(losses: chex.Array, kind: str = "last") -> float:
  """Validation score of losses [num_optimizees, num_steps + 1]; lower is better.

  "last" (the paper's): mean loss at the last step; "mean": over all steps;
  "log_last": mean ln(loss) at the last step. Anything non-finite scores +inf.
  """
  if kind not in SCORES:
    raise ValueError(f"curriculum.score={kind!r}; allowed: {sorted(SCORES)}")
  losses = np.asarray(losses, np.float64)
  if losses.ndim != 2:
    raise ValueError(f"validation losses must be [num_optimizees, num_steps + 1], "
                     f"got shape {losses.shape}")
  with np.errstate(all="ignore"):
    s = SCORES[kind](losses)
  return s if math.isfinite(s) else math.inf
