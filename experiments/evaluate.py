r"""Evaluates a trained optimizer on other problems, beside Adam at its best rate.

  python -m experiments.evaluate --workdir=runs/dm_mnist \
      --problems=mnist_relu,mnist_deeper,mnist_conv --steps=10000 --seeds=10 \
      --data_path=/data/mnist10k.npz

Reads WORKDIR/theta.msgpack and writes, per problem P, WORKDIR/eval_P.csv (every
curve: optimizer,run,step,loss), WORKDIR/eval_P.png, and WORKDIR/eval_summary.md
(mean ln(loss) at --report_steps). Adam's learning rate is tuned on --tune_seeds
separate optimizees; both optimizers then run on the same --seeds optimizees
(same inits, same minibatches).
"""
import json
import os

import jax
from absl import app, flags

from l2ojax import checkpoints, evaluation, optimizees, plots

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding theta.msgpack.")
_THETA = flags.DEFINE_string("theta", "", "Trained optimizer file (default WORKDIR/theta.msgpack).")
_PROBLEMS = flags.DEFINE_list("problems", ["mnist_relu", "mnist_deeper", "mnist_conv"],
                              f"Optimizees by name; known: {optimizees.names()}")
_STEPS = flags.DEFINE_integer("steps", 10000, "Optimizee steps per evaluation run.")
_SEEDS = flags.DEFINE_integer("seeds", 10, "Evaluation runs (fresh optimizees) per problem.")
_TUNE_SEEDS = flags.DEFINE_integer("tune_seeds", 3, "Separate runs Adam's rate is tuned on.")
_TUNE_STEPS = flags.DEFINE_integer("tune_steps", 0, "Horizon of Adam's tuning (0: --steps).")
_SEED = flags.DEFINE_integer("seed", 12345, "Seed of the evaluation (tuning uses seed + 1).")
_LRS = flags.DEFINE_list("adam_learning_rates", [str(x) for x in evaluation.ADAM_LEARNING_RATES],
                         "Adam's learning-rate grid.")
_REPORT = flags.DEFINE_list("report_steps", [], "Steps of the summary table (default: "
                            "0, steps/10, steps/2, steps).")
_SOURCE = flags.DEFINE_string("data_source", "auto", "Data source: auto, tfds, npz, idx.")
_PATH = flags.DEFINE_string("data_path", "", "npz file or IDX folder for every data problem.")
_PATHS = flags.DEFINE_list("data_paths", [], "Per-problem overrides: PROBLEM=PATH,...")
_SPLIT = flags.DEFINE_string("data_split", "test", "Data split (the paper's: MNIST's test split).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "tensorflow-datasets data_dir.")
_RELU_ON_LOGITS = flags.DEFINE_bool("relu_on_logits", False, "Conv nets: ReLU on the logits, "
                                    "as the paper's code did (to reproduce its figures).")


def build(name: str, paths: dict):
  options = {}
  if name in ("mnist_conv", "cifar_conv"):
    options["relu_on_logits"] = _RELU_ON_LOGITS.value
  if optimizees.uses_data(name):
    options.update(source=_SOURCE.value, path=paths.get(name, _PATH.value),
                   split=_SPLIT.value, data_dir=_DATA_DIR.value)
  return optimizees.get(name, **options)


def main(argv):
  del argv
  workdir, steps = _WORKDIR.value, _STEPS.value
  if not workdir:
    raise app.UsageError("--workdir is required")
  paths = dict(item.split("=", 1) for item in _PATHS.value)
  unknown = [p for p in _PROBLEMS.value + list(paths) if p not in optimizees.names()]
  if unknown:
    raise app.UsageError(f"unknown problems {unknown}; known: {optimizees.names()}")
  report = sorted({int(s) for s in _REPORT.value} or {0, steps // 10, steps // 2, steps})
  if report[-1] > steps or report[0] < 0:
    raise app.UsageError(f"--report_steps {report} must lie in [0, --steps={steps}]")
  lopt, theta, info = checkpoints.load_theta(_THETA.value or os.path.join(workdir, "theta.msgpack"))
  label = f"{lopt.name} (trained on {info.get('optimizee', '?')})"
  eval_keys = jax.random.split(jax.random.PRNGKey(_SEED.value), _SEEDS.value)
  tune_keys = jax.random.split(jax.random.PRNGKey(_SEED.value + 1), _TUNE_SEEDS.value)
  rows, grids = {}, {}
  for name in _PROBLEMS.value:
    optimizee = build(name, paths)
    result = evaluation.compare_with_adam(
        lopt.transform(theta), optimizee, eval_keys, tune_keys, steps,
        tuple(float(x) for x in _LRS.value), _TUNE_STEPS.value, label)
    rows[name], grids[name] = result.curves, result.tuned._asdict()
    evaluation.write_curves_csv(os.path.join(workdir, f"eval_{name}.csv"), result.curves)
    plots.plot_curves(os.path.join(workdir, f"eval_{name}.png"), result.curves,
                      title=f"{name}: {_SEEDS.value} fresh optimizees")
    print(evaluation.markdown_table({name: result.curves}, report), flush=True)
  table = evaluation.markdown_table(rows, report)
  with open(os.path.join(workdir, "eval_summary.md"), "w") as f:
    f.write(f"Mean ln(loss) over {_SEEDS.value} runs; Adam tuned on {_TUNE_SEEDS.value} "
            f"separate runs.\n\n{table}\n```json\n{json.dumps(grids, indent=1)}\n```\n")
  print(table)
  print(f"wrote {workdir}/eval_<problem>.csv, .png and eval_summary.md")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
