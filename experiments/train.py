r"""Meta-trains a learned optimizer from an ml_collections config.

  python -m experiments.train --config=experiments/configs/dm_mnist.py \
      --config.meta.batch_size=8 --workdir=/tmp/dm_mnist

With no --config it runs the built-in default (L2O-DM on the quadratic
family, no download). ``--override=field=value`` (repeatable) sets any field
after the config's flags, including the learned optimizer's and the
optimizee's options, which ``--config.`` flags cannot add:
``--override=model.options.lstm_kernel=pallas``. A workdir holds config.json,
checkpoints/, metrics.jsonl, theta.msgpack, eval.json and eval.png; re-running
the same command resumes.

--max_minutes=M stops after the episode under way once M minutes have passed,
checkpoints it, and exits with status 75 (EX_TEMPFAIL: run the same command
again to go on); SIGTERM does the same at once. The evaluation runs only when
training is complete. For jobs under a time limit:

  until python -m experiments.train ... --max_minutes=50; [ $? -ne 75 ]; do :; done
"""
import json
import os
import sys

import jax
import numpy as np
import optax
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import hugepages, kernel_constants
from experiments.configs import dm_quadratic
from l2ojax import evaluation, plots
from l2ojax.meta import config as config_lib
from l2ojax.meta import trainer


def define_flags() -> None:
  """The command line's flags, defined when run as a program (experiments modules
  share flag names such as workdir: importing several in one process must work)."""
  global _CONFIG, _WORKDIR, _OVERRIDES, _MAX_MINUTES, _KERNEL_CONSTANTS
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config.name>).")
  _OVERRIDES = flags.DEFINE_multi_string("override", [], "field=value, applied after the "
                                          "config (l2ojax.meta.config.override).")
  _MAX_MINUTES = flags.DEFINE_float("max_minutes", None,
                                    "Pause (checkpoint, exit 75) after this many minutes.")
  _KERNEL_CONSTANTS = flags.DEFINE_multi_string("kernel_constant", [],
                                                kernel_constants.FLAG_HELP)


def evaluate_against_adam(config, result) -> dict:
  """Trained optimizer vs Adam at its best rate, on the same fresh optimizees."""
  ev = config.eval
  optimizee = trainer.build_optimizee(config)
  keys = jax.random.split(jax.random.PRNGKey(ev.seed), ev.num_optimizees)
  learned = evaluation.curves(result.lopt.transform(result.theta), optimizee, keys, ev.steps,
                              flat_carry=True)
  tuned = evaluation.tune_learning_rate(optax.adam, optimizee, keys, ev.steps,
                                        tuple(ev.adam_learning_rates))
  adam = evaluation.curves(optax.adam(tuned.learning_rate), optimizee, keys, ev.steps)
  summary = {"steps": ev.steps, "num_optimizees": ev.num_optimizees,
             "learned_final_loss": float(learned[:, -1].mean()),
             "adam_final_loss": float(adam[:, -1].mean()),
             "adam_learning_rate": tuned.learning_rate, "adam_grid": tuned.scores}
  with open(os.path.join(result.workdir, "eval.json"), "w") as f:
    json.dump(summary, f, indent=2)
  np.savez(os.path.join(result.workdir, "eval_curves.npz"), learned=learned, adam=adam)
  plots.plot_curves(os.path.join(result.workdir, "eval.png"),
                    {f"{result.lopt.name} (learned)": learned,
                     f"Adam lr={tuned.learning_rate:g}": adam},
                    title=f"{config.optimizee.name}: {ev.num_optimizees} fresh optimizees")
  return summary


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  kernel_constants.set_from_command_line(_KERNEL_CONSTANTS.value)
  config = _CONFIG.value if _CONFIG.value is not None else dm_quadratic.get_config()
  for item in _OVERRIDES.value:
    try:
      config_lib.override(config, item)
    except config_lib.ConfigError as e:
      raise app.UsageError(str(e)) from None
  config_lib.validate(config)  # before anything is built or compiled
  workdir = _WORKDIR.value or os.path.join("runs", config.name)
  print(f"config {config.name}, workdir {workdir}, devices {jax.devices()}")
  max_seconds = None if _MAX_MINUTES.value is None else 60.0 * _MAX_MINUTES.value
  with trainer.sigterm_requests_stop() as should_stop:
    result = trainer.train(config, workdir, max_seconds=max_seconds, should_stop=should_stop)
  if not result.finished:
    sys.exit(trainer.EXIT_PAUSED)
  if jax.process_index() != 0:  # under jax.distributed the first process evaluates
    return
  s = evaluate_against_adam(config, result)
  print(f"mean loss after {s['steps']} steps on {s['num_optimizees']} fresh optimizees: "
        f"learned {s['learned_final_loss']:.6g}, "
        f"Adam (best lr {s['adam_learning_rate']:g}) {s['adam_final_loss']:.6g}")
  print(f"wrote {workdir}/metrics.jsonl, theta.msgpack, eval.json, eval.png")


if __name__ == "__main__":
  define_flags()
  hugepages.ensure()  # before any work: it re-executes the process
  app.run(main)
