"""Evaluation: loss curves of optimizers on the same fresh optimizees, tuned baselines.

Every optimizer compared on a problem runs on the same optimizees: evaluation
key ``i`` draws optimizee ``i``'s init and the minibatch of each of its steps,
whichever optimizer is running. Baselines' learning rates are tuned by grid
search on other keys, so a rate is never chosen on the runs it is scored on.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from l2ojax.meta.unroll import UnrollState, init_state, scan_steps

ADAM_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
DEFAULT_CHUNK = 1000  # optimizee steps per jitted call of a long evaluation


class Baseline(NamedTuple):
  """An analytical optimizer family: ``make_tx(learning_rate)`` and the grid it is tuned on."""
  label: str
  make_tx: Callable[[chex.Numeric], optax.GradientTransformation]
  learning_rates: Tuple[float, ...]


def _sgd_momentum(learning_rate: chex.Numeric) -> optax.GradientTransformation:
  return optax.sgd(learning_rate, momentum=0.9)


BASELINES: Dict[str, Baseline] = {
    "adam": Baseline("Adam", optax.adam, ADAM_LEARNING_RATES),
    "rmsprop": Baseline("RMSProp", optax.rmsprop, (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)),
    "sgd_momentum": Baseline("SGD-momentum", _sgd_momentum,
                             (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)),
}


def baseline_label(name: str, learning_rate: float) -> str:
  return f"{BASELINES[name].label} lr={learning_rate:g}"


def adam_label(learning_rate: float) -> str:
  return baseline_label("adam", learning_rate)


def _run(make_tx: Callable[[Any], optax.GradientTransformation], hypers: chex.Array, optimizee,
         keys: chex.Array, num_steps: int, chunk: int = 0, desc: str = "",
         progress: bool = False, flat_carry: bool = False) -> np.ndarray:
  """Losses [len(hypers), len(keys), num_steps + 1] of ``make_tx(h)`` for each h.

  Runs in jitted chunks of ``chunk`` steps (0: one call) with a progress bar.
  The step keys are those of ``l2ojax.meta.rollout``, so any chunking gives
  the same curves as one ``rollout`` per key. ``flat_carry``: ``scan_steps``'s.
  """
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}")
  chunk = num_steps if chunk <= 0 else min(chunk, num_steps)

  def start(h, key):
    k_init, k_steps = jax.random.split(key)
    return init_state(make_tx(h), optimizee, k_init), jax.random.split(k_steps, num_steps + 1)

  def advance(h, state: UnrollState, step_keys):
    return scan_steps(make_tx(h), optimizee, state, step_keys, flat_carry=flat_carry)

  def finish(state: UnrollState, key):
    return optimizee.loss(state.params, state.instance, key)

  # Outer vmap over hyperparameters, inner over optimizees; step keys are shared by all h.
  start = jax.jit(jax.vmap(jax.vmap(start, (None, 0)), (0, None)))
  advance = jax.jit(jax.vmap(jax.vmap(advance, (None, 0, 0)), (0, 0, None)), donate_argnums=1)
  finish = jax.jit(jax.vmap(jax.vmap(finish, (0, 0)), (0, None)))

  state, step_keys = start(hypers, keys)
  step_keys = step_keys[0]  # identical for every h: [num_keys, num_steps + 1, ...]
  pieces = []
  with tqdm(total=num_steps, desc=desc, unit="step", disable=not progress, leave=False) as bar:
    for a in range(0, num_steps, chunk):
      b = min(a + chunk, num_steps)
      state, losses = advance(hypers, state, step_keys[:, a:b])
      pieces.append(np.asarray(losses))
      bar.update(b - a)
  pieces.append(np.asarray(finish(state, step_keys[:, -1]))[..., None])
  return np.concatenate(pieces, axis=-1)


def curves(tx: optax.GradientTransformation, optimizee, keys: chex.Array, num_steps: int,
           chunk: int = 0, desc: str = "", progress: bool = False,
           flat_carry: bool = False) -> np.ndarray:
  """Losses [len(keys), num_steps + 1] of ``tx``; key i draws the same init and
  minibatches for every ``tx``.

  ``flat_carry``: the loop carries the parameters as one vector (``scan_steps``;
  the same curves). Faster for a learned optimizer, which ravels them anyway (on
  a GPU, W2 of L2O-DM: 20 -> 19 kernels per step, 11 -> 8 with the fused MLP),
  slower for a per-leaf optax transformation such as Adam (19 -> 25).
  """
  return _run(lambda _: tx, jnp.zeros((1,)), optimizee, keys, num_steps, chunk, desc,
              progress, flat_carry)[0]


def grid_curves(make_tx: Callable[[chex.Numeric], optax.GradientTransformation], optimizee,
                keys: chex.Array, num_steps: int, learning_rates: Sequence[float],
                chunk: int = 0, desc: str = "", progress: bool = False) -> np.ndarray:
  """Losses [len(learning_rates), len(keys), num_steps + 1]; one compile for the grid
  (the rate is a traced argument, vmapped)."""
  if not learning_rates:
    raise ValueError("learning_rates must be non-empty")
  return _run(make_tx, jnp.asarray(learning_rates, jnp.float32), optimizee, keys, num_steps,
              chunk, desc, progress)


class Tuned(NamedTuple):
  learning_rate: float
  scores: Dict[float, float]  # learning rate -> mean final loss (inf when a run diverged)


def tune_learning_rate(make_tx: Callable[[chex.Numeric], optax.GradientTransformation], optimizee,
                       keys: chex.Array, num_steps: int,
                       learning_rates: Sequence[float] = ADAM_LEARNING_RATES,
                       chunk: int = 0, desc: str = "", progress: bool = False) -> Tuned:
  """Grid search: the rate whose mean loss at the last step is lowest.

  Runs that end non-finite score +inf, so a diverging rate is never chosen.
  """
  losses = grid_curves(make_tx, optimizee, keys, num_steps, learning_rates, chunk, desc,
                       progress)
  final = losses[:, :, -1]
  scores = np.where(np.isfinite(final).all(axis=1), final.mean(axis=1), np.inf)
  best = int(np.argmin(scores))
  return Tuned(float(learning_rates[best]),
               {float(lr): float(s) for lr, s in zip(learning_rates, scores)})


class Evaluation(NamedTuple):
  curves: Dict[str, np.ndarray]  # label -> losses [num_runs, num_steps + 1]
  tuned: Dict[str, Tuned]        # baseline name -> its grid search (on separate keys)


def evaluate(learned: Mapping[str, optax.GradientTransformation], optimizee,
             eval_keys: chex.Array, tune_keys: chex.Array, num_steps: int,
             baselines: Sequence[str] = ("adam", "rmsprop", "sgd_momentum"),
             grids: Optional[Mapping[str, Sequence[float]]] = None, tune_steps: int = 0,
             chunk: int = DEFAULT_CHUNK, progress: bool = False) -> Evaluation:
  """Curves of each ``learned`` optimizer and of each baseline at its tuned rate.

  Baselines are tuned on ``tune_keys`` for ``tune_steps`` (0: ``num_steps``)
  steps over ``grids[name]`` (default: ``BASELINES[name].learning_rates``);
  then every optimizer runs on ``eval_keys``: the same inits and minibatches.
  The learned optimizers' loops carry the parameters flat (``curves``).
  """
  unknown = [b for b in baselines if b not in BASELINES]
  if unknown:
    raise ValueError(f"unknown baselines {unknown}; known: {sorted(BASELINES)}")
  grids = dict(grids or {})
  out, tuned = {}, {}
  for label, tx in learned.items():
    out[label] = curves(tx, optimizee, eval_keys, num_steps, chunk, label, progress,
                        flat_carry=True)
  for name in baselines:
    base = BASELINES[name]
    tuned[name] = tune_learning_rate(base.make_tx, optimizee, tune_keys, tune_steps or num_steps,
                                     tuple(grids.get(name, base.learning_rates)), chunk,
                                     f"tuning {base.label}", progress)
    lr = tuned[name].learning_rate
    out[baseline_label(name, lr)] = curves(base.make_tx(lr), optimizee, eval_keys, num_steps,
                                           chunk, baseline_label(name, lr), progress)
  return Evaluation(out, tuned)


class Comparison(NamedTuple):
  curves: Dict[str, np.ndarray]  # label -> losses [num_runs, num_steps + 1]
  tuned: Tuned                   # Adam's grid search (on separate keys)


def compare_with_adam(tx: optax.GradientTransformation, optimizee, eval_keys: chex.Array,
                      tune_keys: chex.Array, num_steps: int,
                      learning_rates: Sequence[float] = ADAM_LEARNING_RATES,
                      tune_steps: int = 0, label: str = "learned") -> Comparison:
  """``evaluate`` with Adam as the only baseline."""
  ev = evaluate({label: tx}, optimizee, eval_keys, tune_keys, num_steps, ("adam",),
                {"adam": learning_rates}, tune_steps)
  return Comparison(ev.curves, ev.tuned["adam"])


def steps_to_target(losses: np.ndarray, target: float) -> Optional[int]:
  """First step at which the mean ln(loss) over runs is at or below ln(target); None if never.

  A step at which any run is non-finite does not count.
  """
  losses = np.asarray(losses, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    mean = np.log(np.maximum(losses, 1e-30)).mean(axis=0)
  hit = np.isfinite(losses).all(axis=0) & (mean <= np.log(target))
  return int(np.argmax(hit)) if hit.any() else None


def _log_at(losses: np.ndarray, steps: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """ln(loss) [runs, len(steps)] (a loss of exactly 0 counts as 1e-30) and, per step,
  whether every run is finite there."""
  at = np.asarray(losses, np.float64)[:, list(steps)]
  with np.errstate(divide="ignore", invalid="ignore"):
    logs = np.log(np.maximum(at, 1e-30))
  return logs, np.isfinite(at).all(axis=0)


def mean_log_loss(losses: np.ndarray, steps: Sequence[int]) -> np.ndarray:
  """The paper's y axis: mean over runs of ln(loss) at each of ``steps``.

  A run that is non-finite at a step makes that entry nan (diverged), never a
  number that hides it.
  """
  logs, finite = _log_at(losses, steps)
  return np.where(finite, logs.mean(axis=0), np.nan)


def median_log_loss(losses: np.ndarray, steps: Sequence[int]) -> np.ndarray:
  """Median over runs of ln(loss) at each of ``steps`` (nan where a run diverged).

  Unlike the mean, one run whose minibatch loss reaches exactly 0 (counted
  as 1e-30, ln = -69) does not move it.
  """
  logs, finite = _log_at(losses, steps)
  return np.where(finite, np.median(logs, axis=0), np.nan)


def std_log_loss(losses: np.ndarray, steps: Sequence[int]) -> np.ndarray:
  """Standard deviation over runs of ln(loss) at each of ``steps`` (nan where diverged)."""
  logs, finite = _log_at(losses, steps)
  return np.where(finite, logs.std(axis=0), np.nan)


def markdown_table(rows: Mapping[str, Mapping[str, np.ndarray]], steps: Sequence[int],
                   targets: Optional[Mapping[str, float]] = None, with_std: bool = False,
                   median: bool = False) -> str:
  """``rows``: problem -> {optimizer label -> losses}; mean ln(loss) at ``steps``.

  ``with_std`` adds the standard deviation over runs; ``targets`` (problem ->
  loss) adds the first step at which each optimizer's mean ln(loss) reaches it.
  ``median`` shows the median over runs instead of the mean (and no std).
  """
  if median:
    with_std = False
  head = "| problem | optimizer | " + " | ".join(f"step {s}" for s in steps)
  cols = 2 + len(steps)
  if targets is not None:
    head += " | steps to target"
    cols += 1
  lines = [head + " |", "|" + "---|" * cols]
  for problem, by_label in rows.items():
    for label, losses in by_label.items():
      vals = (median_log_loss if median else mean_log_loss)(losses, steps)
      stds = std_log_loss(losses, steps) if with_std else np.zeros_like(vals)
      cells = [("diverged" if np.isnan(v) else
                f"{v:.3f} ± {d:.3f}" if with_std else f"{v:.3f}") for v, d in zip(vals, stds)]
      if targets is not None:
        hit = steps_to_target(losses, targets[problem]) if problem in targets else None
        cells.append("never" if hit is None else str(hit))
      lines.append(f"| {problem} | {label} | " + " | ".join(cells) + " |")
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
