"""A run's per-episode metrics as TensorBoard scalars (``tensorboard=True``; tensorboardX).

``metrics.jsonl`` stays the record; the event files under ``WORKDIR/tensorboard``
are a view of it, written as training goes (``EpisodeScalars``) or afterwards
from the record (``from_metrics``, ``python -m experiments.tensorboard``).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional

from l2ojax.meta import metrics

# metrics.jsonl field -> TensorBoard tag
TAGS = {
    "meta_loss": "train/meta_loss",
    "imitation_loss": "train/imitation_loss",
    "train_loss": "train/mean_optimizee_loss",
    "final_loss": "train/last_optimizee_loss",
    "meta_grad_norm": "train/meta_grad_norm",
    "val_loss": "validation/score",
    "stage": "curriculum/stage",
    "episode_steps": "curriculum/episode_steps",
    "skipped_updates": "health/skipped_updates",
    "diverged": "health/diverged_optimizees",
    "seconds": "time/episode_seconds",
}


def _summary_writer(logdir: str, purge_step: Optional[int]):
  try:
    from tensorboardX import SummaryWriter
  except ImportError as e:
    raise ImportError("tensorboard=True writes TensorBoard event files with tensorboardX, "
                      "which is not installed: pip install 'l2ojax[tensorboard]' (or "
                      "tensorboardX), or set tensorboard=False (metrics.jsonl has the same "
                      "figures)") from e
  return SummaryWriter(logdir, purge_step=purge_step)


class EpisodeScalars:
  """Writes each episode's metrics row (``metrics.jsonl``'s) as scalars at step = episode.

  ``resume_episode``: a run resumed from the checkpoint of that episode hides the
  events of its earlier call from that episode on (TensorBoard's purge step), as
  ``metrics.jsonl`` is cut back there.
  """

  def __init__(self, logdir: str, resume_episode: int = 0):
    self._writer = _summary_writer(logdir, resume_episode if resume_episode > 0 else None)

  def write(self, row: Mapping[str, Any]) -> None:
    for field, tag in TAGS.items():
      if field in row:
        self._writer.add_scalar(tag, float(row[field]), global_step=int(row["episode"]))

  def close(self) -> None:
    self._writer.close()


def from_metrics(workdir: str, logdir: str = "") -> str:
  """Writes ``WORKDIR/metrics.jsonl`` as event files into ``logdir`` (default
  ``WORKDIR/tensorboard``); returns ``logdir``."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no metrics.jsonl (is {workdir!r} a training's workdir?)")
  logdir = logdir or os.path.join(workdir, "tensorboard")
  scalars = EpisodeScalars(logdir)
  try:
    for row in metrics.read_rows(path):
      scalars.write(row)
  finally:
    scalars.close()
  return logdir
