r"""Evaluates a learned optimizer beside tuned Adam, RMSProp and SGD-momentum.

  python -m experiments.evaluate --workdir=runs/dm_mnist \
      --problems=mnist_mlp,mnist_relu,mnist_deeper --steps=10000 --seeds=10 \
      --data_path=/data/mnist10k.npz
  python -m experiments.evaluate --optimizer=dm_cl_il_mnist --workdir=runs/eval_pretrained ...

The learned optimizer is WORKDIR/theta.msgpack, --theta=FILE, or the shipped
pretrained optimizer --optimizer=NAME (see ``l2ojax.pretrained.names()``).
Each baseline's learning rate is tuned by grid search on --tune_seeds separate
optimizees (the chosen rate is recorded); then every optimizer runs on the same
--seeds fresh optimizees (same inits, same minibatches), vmapped. Writes, per
problem P, WORKDIR/eval_P.csv (every curve: optimizer,run,step,loss) and
WORKDIR/eval_P.png (ln loss against step, mean and a one-std band), plus
WORKDIR/eval_summary.md (mean ± std of ln(loss) at --report_steps and the first
step at which the mean reaches the target loss) and eval_summary.json.
"""
import ast
import datetime
import json
import os
import platform
import time

import jax
from absl import app, flags

from experiments import hugepages
from l2ojax import checkpoints, evaluation, models, optimizees, plots, pretrained


def define_flags() -> None:
  """The command line's flags, defined when run as a program (experiments modules
  share flag names such as workdir: importing several in one process must work)."""
  global _WORKDIR, _THETA, _OPTIMIZER, _PROBLEMS, _STEPS, _SEEDS, _TUNE_SEEDS, _TUNE_STEPS
  global _SEED, _BASELINES, _GRIDS, _REPORT, _TARGETS, _CHUNK, _SOURCE, _PATH, _PATHS
  global _SPLIT, _DATA_DIR, _MACHINE, _MODEL_OPTIONS, _OPTIMIZEE_KERNEL, _RELU_ON_LOGITS
  _WORKDIR = flags.DEFINE_string("workdir", None,
                                 "Output folder (and default home of theta.msgpack).")
  _THETA = flags.DEFINE_string("theta", "",
                               "Trained optimizer file (default WORKDIR/theta.msgpack).")
  _OPTIMIZER = flags.DEFINE_string("optimizer", "", "A shipped pretrained optimizer by name "
                                   "(instead of a theta file).")
  _PROBLEMS = flags.DEFINE_list("problems", ["mnist_relu", "mnist_deeper", "mnist_conv"],
                                f"Optimizees by name; known: {optimizees.names()}")
  _STEPS = flags.DEFINE_integer("steps", 10000, "Optimizee steps per evaluation run.")
  _SEEDS = flags.DEFINE_integer("seeds", 10,
                                "Evaluation runs (fresh optimizees, vmapped) per problem.")
  _TUNE_SEEDS = flags.DEFINE_integer("tune_seeds", 3, "Separate runs the baselines are tuned on.")
  _TUNE_STEPS = flags.DEFINE_integer("tune_steps", 0, "Horizon of the tuning (0: --steps).")
  _SEED = flags.DEFINE_integer("seed", 12345, "Seed of the evaluation (tuning uses seed + 1).")
  _BASELINES = flags.DEFINE_list(
      "baselines", ["adam", "rmsprop", "sgd_momentum"],
      f"Tuned analytical optimizers; known: {sorted(evaluation.BASELINES)}")
  _GRIDS = {name: flags.DEFINE_list(f"{name}_learning_rates",
                                    [str(x) for x in base.learning_rates],
                                    f"{base.label}'s learning-rate grid.")
            for name, base in evaluation.BASELINES.items()}
  _REPORT = flags.DEFINE_list("report_steps", [], "Steps of the summary table (default: "
                              "0, 100, 1000, 10000 and --steps, those within --steps).")
  _TARGETS = flags.DEFINE_list("targets", [], "Target losses PROBLEM=LOSS,... for the "
                               "steps-to-target column (default: tuned Adam's mean final loss).")
  _CHUNK = flags.DEFINE_integer("chunk", evaluation.DEFAULT_CHUNK,
                                "Optimizee steps per jitted call.")
  _SOURCE = flags.DEFINE_string("data_source", "auto", "Data source: auto, tfds, npz, idx.")
  _PATH = flags.DEFINE_string("data_path", "", "npz file or IDX folder for every data problem.")
  _PATHS = flags.DEFINE_list("data_paths", [], "Per-problem overrides: PROBLEM=PATH,...")
  _SPLIT = flags.DEFINE_string("data_split", "test",
                               "Data split (the paper's: MNIST's test split).")
  _DATA_DIR = flags.DEFINE_string("data_dir", "", "tensorflow-datasets data_dir.")
  _MACHINE = flags.DEFINE_string("machine", "", "Machine to name in the summary (default: "
                                 "platform and device kind).")
  _MODEL_OPTIONS = flags.DEFINE_list("model_options", [], "Overrides of the learned optimizer's "
                                      "options, NAME=VALUE,... (e.g. state_dtype=bfloat16).")
  _OPTIMIZEE_KERNEL = flags.DEFINE_enum(
      "optimizee_kernel", "xla", ["xla", "pallas"], "The MLP problems' loss and gradient per "
      "step: XLA's ops, or one fused Pallas kernel on a GPU (one hidden layer only; "
      "optimizees.mlp_kernel).")
  _RELU_ON_LOGITS = flags.DEFINE_bool("relu_on_logits", False, "Conv nets: ReLU on the logits, "
                                      "as the paper's code did (to reproduce its figures).")


MLP_PROBLEMS = ("mnist_mlp", "mnist_relu", "mnist_deeper", "fashion_mlp")


def build(name: str, paths: dict):
  options = {}
  if name in ("mnist_conv", "cifar_conv"):
    options["relu_on_logits"] = _RELU_ON_LOGITS.value
  if _OPTIMIZEE_KERNEL.value != "xla" and name in MLP_PROBLEMS:
    options["kernel"] = _OPTIMIZEE_KERNEL.value
  if optimizees.uses_data(name):
    options.update(source=_SOURCE.value, path=paths.get(name, _PATH.value),
                   split=_SPLIT.value, data_dir=_DATA_DIR.value)
  return optimizees.get(name, **options)


def _pairs(items, what):
  try:
    return dict(item.split("=", 1) for item in items)
  except ValueError:
    raise app.UsageError(f"--{what} takes NAME=VALUE pairs, got {items}") from None


def load_learned():
  """(label, learned optimizer, theta, info) from --optimizer, --theta or the workdir."""
  if _OPTIMIZER.value:
    if _THETA.value:
      raise app.UsageError("give --optimizer or --theta, not both")
    if _OPTIMIZER.value not in pretrained.names():
      raise app.UsageError(f"--optimizer={_OPTIMIZER.value!r}: no such pretrained optimizer; "
                           f"available: {pretrained.names()}")
    lopt, theta, info = pretrained.load_theta(_OPTIMIZER.value)
    return _OPTIMIZER.value, lopt, theta, info
  path = _THETA.value or os.path.join(_WORKDIR.value, "theta.msgpack")
  if not os.path.exists(path):
    raise app.UsageError(f"no trained optimizer at {path}; give --theta=FILE or "
                         f"--optimizer=NAME (pretrained: {pretrained.names()})")
  lopt, theta, info = checkpoints.load_theta(path)
  return f"{lopt.name} (trained on {info.get('optimizee', '?')})", lopt, theta, info


def with_options(lopt, items):
  """``lopt`` rebuilt with the NAME=VALUE overrides in ``items`` (values as Python literals)."""
  if not items:
    return lopt
  overrides = {}
  for name, value in _pairs(items, "model_options").items():
    try:
      overrides[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[name] = value
  unknown = sorted(set(overrides) - set(lopt.options()))
  if unknown:
    raise app.UsageError(f"--model_options: {unknown} are not options of {lopt.name}; "
                         f"known: {sorted(lopt.options())}")
  return models.get(lopt.name, **{**lopt.options(), **overrides})


def main(argv):
  del argv
  workdir, steps = _WORKDIR.value, _STEPS.value
  paths, targets = _pairs(_PATHS.value, "data_paths"), _pairs(_TARGETS.value, "targets")
  unknown = [p for p in _PROBLEMS.value + list(paths) + list(targets)
             if p not in optimizees.names()]
  if unknown:
    raise app.UsageError(f"unknown problems {unknown}; known: {optimizees.names()}")
  bad = [b for b in _BASELINES.value if b not in evaluation.BASELINES]
  if bad:
    raise app.UsageError(f"unknown baselines {bad}; known: {sorted(evaluation.BASELINES)}")
  report = sorted({int(s) for s in _REPORT.value} or
                  {s for s in (0, 100, 1000, 10000) if s <= steps} | {steps})
  if report[-1] > steps or report[0] < 0:
    raise app.UsageError(f"--report_steps {report} must lie in [0, --steps={steps}]")
  label, lopt, theta, info = load_learned()
  lopt = with_options(lopt, _MODEL_OPTIONS.value)
  if _MODEL_OPTIONS.value:
    label += f" ({', '.join(_MODEL_OPTIONS.value)})"
  os.makedirs(workdir, exist_ok=True)
  grids = {b: tuple(float(x) for x in _GRIDS[b].value) for b in _BASELINES.value}
  eval_keys = jax.random.split(jax.random.PRNGKey(_SEED.value), _SEEDS.value)
  tune_keys = jax.random.split(jax.random.PRNGKey(_SEED.value + 1), _TUNE_SEEDS.value)
  rows, record, target_losses = {}, {}, {}
  for name in _PROBLEMS.value:
    optimizee = build(name, paths)
    t0 = time.perf_counter()
    result = evaluation.evaluate({label: lopt.transform(theta)}, optimizee, eval_keys, tune_keys,
                                 steps, _BASELINES.value, grids, _TUNE_STEPS.value, _CHUNK.value,
                                 progress=True)
    rows[name] = result.curves
    if name in targets:
      target_losses[name] = float(targets[name])
    elif "adam" in result.tuned:
      adam = result.curves[evaluation.adam_label(result.tuned["adam"].learning_rate)]
      target_losses[name] = float(adam[:, -1].mean())
    record[name] = {"tuned": {b: t._asdict() for b, t in result.tuned.items()},
                    "target_loss": target_losses.get(name),
                    "seconds": time.perf_counter() - t0}
    evaluation.write_curves_csv(os.path.join(workdir, f"eval_{name}.csv"), result.curves)
    plots.plot_curves(os.path.join(workdir, f"eval_{name}.png"), result.curves,
                      title=f"{name}: {_SEEDS.value} fresh optimizees")
    print(evaluation.markdown_table({name: result.curves}, report, target_losses, True),
          flush=True)
  table = evaluation.markdown_table(rows, report, target_losses, with_std=True)
  medians = evaluation.markdown_table(rows, report, median=True)
  machine = _MACHINE.value or (f"{platform.machine()}, {jax.devices()[0].device_kind} "
                                f"({jax.default_backend()})")
  shown = ", ".join(f"{p} {t:.4g}" for p, t in target_losses.items())
  with open(os.path.join(workdir, "eval_summary.md"), "w") as f:
    f.write(f"{label}: mean ± std of ln(training loss) over {_SEEDS.value} fresh optimizees, "
            f"the same for every optimizer. Baselines tuned on {_TUNE_SEEDS.value} separate "
            f"optimizees. Steps to target: the first step at which the mean ln(loss) reaches "
            f"ln(target); targets: {shown}. Machine: {machine}.\n\n{table}\n"
            f"Median over runs of ln(training loss) (a run whose minibatch loss reaches "
            f"exactly 0 counts as ln 1e-30 = -69 in the mean, not in the median):\n\n{medians}")
  with open(os.path.join(workdir, "eval_summary.json"), "w") as f:
    json.dump({"optimizer": label, "model": lopt.name, "info": info, "steps": steps,
               "seeds": _SEEDS.value, "tune_seeds": _TUNE_SEEDS.value,
               "tune_steps": _TUNE_STEPS.value or steps, "machine": machine,
               "date": datetime.date.today().isoformat(), "problems": record}, f, indent=1)
  print(table)
  print(f"wrote {workdir}/eval_<problem>.csv, .png, eval_summary.md and eval_summary.json")


if __name__ == "__main__":
  define_flags()
  hugepages.ensure()  # before any work: it re-executes the process
  flags.mark_flag_as_required("workdir")
  app.run(main)
