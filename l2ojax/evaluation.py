"""Evaluation: loss curves of optimizers on the same fresh optimizees, tuned baselines."""
from __future__ import annotations

import functools
from typing import Callable, Dict, Mapping, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from l2ojax.meta.unroll import batch_rollout

ADAM_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _curves(tx: optax.GradientTransformation, optimizee, keys, num_steps):
  return batch_rollout(tx, optimizee, keys, num_steps)


def curves(tx: optax.GradientTransformation, optimizee, keys: chex.Array,
           num_steps: int) -> np.ndarray:
  """Losses [len(keys), num_steps + 1] of ``tx``; key i draws the same init and
  minibatches for every ``tx``."""
  return np.asarray(_curves(tx, optimizee, keys, num_steps))


def _lr_curves(make_tx: Callable[[float], optax.GradientTransformation], optimizee,
               keys, num_steps: int, learning_rates: Sequence[float]) -> chex.Array:
  # One compile for the whole grid: the learning rate is a traced argument.
  def run(lr):
    return batch_rollout(make_tx(lr), optimizee, keys, num_steps)
  return jax.jit(jax.vmap(run))(jnp.asarray(learning_rates, jnp.float32))


class Tuned(NamedTuple):
  learning_rate: float
  scores: Dict[float, float]  # learning rate -> mean final loss (nan/inf when diverged)


def tune_learning_rate(make_tx: Callable[[float], optax.GradientTransformation], optimizee,
                       keys: chex.Array, num_steps: int,
                       learning_rates: Sequence[float] = ADAM_LEARNING_RATES) -> Tuned:
  """Grid search: the rate whose mean loss at the last step is lowest.

  Runs that end non-finite score +inf, so a diverging rate is never chosen.
  """
  if not learning_rates:
    raise ValueError("learning_rates must be non-empty")
  losses = np.asarray(_lr_curves(make_tx, optimizee, keys, num_steps, learning_rates))
  final = losses[:, :, -1]
  scores = np.where(np.isfinite(final).all(axis=1), final.mean(axis=1), np.inf)
  best = int(np.argmin(scores))
  return Tuned(float(learning_rates[best]),
               {float(lr): float(s) for lr, s in zip(learning_rates, scores)})


# --- Evaluation on other problems: a learned optimizer beside Adam at its best rate. ---

class Comparison(NamedTuple):
  curves: Dict[str, np.ndarray]  # label -> losses [num_runs, num_steps + 1]
  tuned: Tuned                   # Adam's grid search (on separate keys)


def adam_label(learning_rate: float) -> str:
  return f"Adam lr={learning_rate:g}"


def compare_with_adam(tx: optax.GradientTransformation, optimizee, eval_keys: chex.Array,
                      tune_keys: chex.Array, num_steps: int,
                      learning_rates: Sequence[float] = ADAM_LEARNING_RATES,
                      tune_steps: int = 0, label: str = "learned") -> Comparison:
  """Curves of ``tx`` and of Adam at the rate tuned on ``tune_keys``, both on ``eval_keys``.

  Tuning on keys other than the evaluation keys keeps Adam's rate from being
  chosen on the very runs it is scored on; on the evaluation keys both
  optimizers see the same inits and minibatches. ``tune_steps`` (0: num_steps)
  is the horizon the rate is tuned for.
  """
  tuned = tune_learning_rate(optax.adam, optimizee, tune_keys, tune_steps or num_steps,
                             learning_rates)
  out = {label: curves(tx, optimizee, eval_keys, num_steps),
         adam_label(tuned.learning_rate): curves(optax.adam(tuned.learning_rate), optimizee,
                                                 eval_keys, num_steps)}
  return Comparison(out, tuned)


def mean_log_loss(losses: np.ndarray, steps: Sequence[int]) -> np.ndarray:
  """The paper's y axis: mean over runs of ln(loss) at each of ``steps``.

  A run that is non-finite at a step makes that entry nan (diverged), never a
  number that hides it.
  """
  losses = np.asarray(losses, np.float64)
  at = losses[:, list(steps)]
  with np.errstate(divide="ignore", invalid="ignore"):
    logs = np.log(np.maximum(at, 1e-30))
  return np.where(np.isfinite(at).all(axis=0), logs.mean(axis=0), np.nan)


def markdown_table(rows: Mapping[str, Mapping[str, np.ndarray]], steps: Sequence[int]) -> str:
  """``rows``: problem -> {optimizer label -> losses}; mean ln(loss) at ``steps``."""
  head = "| problem | optimizer | " + " | ".join(f"step {s}" for s in steps) + " |"
  lines = [head, "|" + "---|" * (2 + len(steps))]
  for problem, by_label in rows.items():
    for label, losses in by_label.items():
      vals = mean_log_loss(losses, steps)
      cells = " | ".join("diverged" if np.isnan(v) else f"{v:.3f}" for v in vals)
      lines.append(f"| {problem} | {label} | {cells} |")
  return "\n".join(lines) + "\n"


def write_curves_csv(path: str, curves_by_label: Mapping[str, np.ndarray]) -> None:
  """Long format, one row per (optimizer, run, step): ``optimizer,run,step,loss``."""
  with open(path, "w") as f:
    f.write("optimizer,run,step,loss\n")
    for label, losses in curves_by_label.items():
      losses = np.asarray(losses)
      for run in range(losses.shape[0]):
        f.writelines(f"{label},{run},{step},{loss:.9g}\n" for step, loss in enumerate(losses[run]))


def read_curves_csv(path: str) -> Dict[str, np.ndarray]:
  """Inverse of ``write_curves_csv``."""
  rows: Dict[str, Dict[int, Dict[int, float]]] = {}
  with open(path) as f:
    next(f)
    for line in f:
      label, run, step, loss = line.rstrip("\n").rsplit(",", 3)
      rows.setdefault(label, {}).setdefault(int(run), {})[int(step)] = float(loss)
  return {label: np.array([[r[s] for s in sorted(r)] for _, r in sorted(runs.items())])
          for label, runs in rows.items()}
