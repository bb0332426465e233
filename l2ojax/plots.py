"""Paper-style plots: ln(loss) against step, mean over optimizees with a band."""
from __future__ import annotations

from typing import Mapping

import numpy as np


def plot_curves(path: str, curves: Mapping[str, np.ndarray], title: str = "") -> None:
  """``curves`` maps a label to losses [num_optimizees, num_steps + 1]; writes a PNG.

  The band is one standard deviation of ln(loss) across optimizees.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for label, losses in curves.items():
    log = np.log(np.maximum(np.asarray(losses, np.float64), 1e-30))
    mean, std = log.mean(axis=0), log.std(axis=0)
    steps = np.arange(log.shape[1])
    ax.plot(steps, mean, label=label)
    ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
  ax.set_xlabel("step")
  ax.set_ylabel("ln(training loss)")
  if title:
    ax.set_title(title)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
