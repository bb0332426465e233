r"""The paper's ablation of its training techniques on the MNIST MLP, one command.

  python -m experiments.ablation --workdir=runs/ablation \
      --override=data.path=/path/mnist10k.npz

meta-trains DM, DM-AUG, DM-IL, DM-CL and DM-CL-IL (experiments/configs/
dm_mnist.py) into WORKDIR/<variant> (re-running resumes), evaluates each on
the same fresh optimizees beside Adam at its best learning rate, and writes
WORKDIR/ablation.{md,json,png}: mean ln(training loss) at steps 100, 1,000
and 10,000 next to the paper's figures, and each meta-training's wall time.

``--family=rnnprop`` (or ``scale``) does the same for RNNProp (L2O-Scale),
by default its plain and CL-IL variants (experiments/configs/rnnprop_mnist.py,
scale_mnist.py): the paper's claim that the techniques lift every model.
``--max_minutes=M`` trains the variants in turn until M minutes have passed,
checkpoints the one under way and exits with status 75 (SIGTERM: the same at
once); the same command goes on from there, and the call that finishes the
last variant writes the table. ``--status`` prints how far each variant got.
``--override=field=value`` (repeatable) applies to every variant, e.g. a
scaled-down run: --override=meta.num_episodes=40 --override='curriculum.schedule=(100, 200)'
--override=dm_aug:meta.num_episodes=8. Learned curves are cached per variant
(curves_<variant>.npy), so variants may be trained by separate processes
(--variants=dm,dm_cl) and a last call with all of them writes the table;
``--processes=N`` does that by itself, N variants at a time sharing the device.
``--untrained`` adds a row for the model at the theta its trainings start from,
which shows how far meta-training moved it (L2O-Scale's recipe, RMSProp at
1e-6, moves it slowly: untrained, it takes ln(loss) on the MNIST MLP only from
0.83 to 0.76 in 2,000 steps).
"""
import json
import os
import platform
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import optax
from absl import app, flags, logging

from experiments import hugepages, kernel_constants
from experiments.configs import dm_mnist, rnnprop_mnist, scale_mnist
from l2ojax import evaluation, plots
from l2ojax.meta import config as config_lib
from l2ojax.meta import metrics
from l2ojax.meta import trainer

FAMILIES = {"dm": dm_mnist, "rnnprop": rnnprop_mnist, "scale": scale_mnist}


def define_flags() -> None:
  """The command line's flags, defined when run as a program (experiments modules
  share flag names such as workdir: importing several in one process must work)."""
  global _WORKDIR, _FAMILY, _VARIANTS, _MAX_MINUTES, _OVERRIDES, _EVAL_STEPS, _EVAL_N
  global _LABEL, _STATUS, _PROCESSES, _TABLE, _KERNEL_CONSTANTS, _UNTRAINED
  _WORKDIR = flags.DEFINE_string("workdir", "runs/ablation", "Output folder.")
  _FAMILY = flags.DEFINE_enum("family", "dm", list(FAMILIES), "Learned optimizer family.")
  _VARIANTS = flags.DEFINE_list(
      "variants", None, "Variants to run (default: those with a paper figure, i.e. all five "
      "for dm, plain and CL-IL for rnnprop and scale).")
  _MAX_MINUTES = flags.DEFINE_float("max_minutes", None,
                                    "Pause (checkpoint, exit 75) after this many minutes.")
  _OVERRIDES = flags.DEFINE_multi_string(
      "override", [], "field=value for every variant's config; variant:field=value for one.")
  _EVAL_STEPS = flags.DEFINE_integer("eval_steps", 0, "Evaluation steps (0: config eval.steps).")
  _EVAL_N = flags.DEFINE_integer("eval_optimizees", 0, "Fresh optimizees (0: config eval).")
  _LABEL = flags.DEFINE_string("label", "", "Run description for the table's caption.")
  _STATUS = flags.DEFINE_bool("status", False, "Print each variant's training progress and exit.")
  _PROCESSES = flags.DEFINE_integer(
      "processes", 1, "Train up to this many variants at once, each in its own process sharing "
      "the device (XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / processes unless set); logs in "
      "WORKDIR/<variant>.log. Then this process evaluates and writes the table.")
  _TABLE = flags.DEFINE_bool("table", True, "Write WORKDIR/ablation.{md,json,png} (the processes "
                             "--processes starts leave it to their parent).")
  _KERNEL_CONSTANTS = flags.DEFINE_multi_string("kernel_constant", [],
                                                kernel_constants.FLAG_HELP)
  _UNTRAINED = flags.DEFINE_bool(
      "untrained", False, "Also evaluate the family's model at the theta its trainings start "
      "from (their seed's draw): a row that shows how far meta-training moved it.")


REPORT_STEPS = (100, 1000, 10000)


def ln_at(losses: np.ndarray, steps) -> dict:
  """Mean over optimizees of ln(loss) at each step that the curve reaches."""
  log = np.log(np.maximum(np.asarray(losses, np.float64), 1e-30))
  return {int(s): float(log[:, s].mean()) for s in steps if s < log.shape[1]}


def cached_curves(stem: str, tag: dict, tx, optimizee, keys, steps: int) -> np.ndarray:
  """``tx``'s evaluation curves; reused when the same ``tag`` (what was trained, and
  how long) was already evaluated on as many optimizees and steps."""
  tag = {**tag, "steps": steps, "num_optimizees": int(keys.shape[0])}
  if os.path.exists(stem + ".npy") and os.path.exists(stem + ".json"):
    if json.load(open(stem + ".json")) == tag:
      return np.load(stem + ".npy")
  learned = evaluation.curves(tx, optimizee, keys, steps, flat_carry=True)
  np.save(stem + ".npy", learned)
  with open(stem + ".json", "w") as f:
    json.dump(tag, f)
  return learned


def table(results: dict, steps, caption: str) -> str:
  head = " | ".join(f"step {s:,}" for s in steps)
  lines = [caption, "", f"| optimizer | {head} | paper, step 10,000 | meta-training wall time |",
           "|---" * (len(steps) + 3) + "|"]
  for name, r in results.items():
    cells = " | ".join(f"{r['ln_loss'].get(str(s), r['ln_loss'].get(s, float('nan'))):.2f}"
                       for s in steps)
    paper = r.get("paper_ln_loss_10k")
    wall = r.get("train_seconds")
    lines.append(f"| {name} | {cells} | {'' if paper is None else f'~{paper:g}'} | "
                 f"{'' if wall is None else f'{wall / 60:.1f} min'} |")
  return "\n".join(lines) + "\n"


def build_configs(family, variants, overrides) -> dict:
  """Each variant's config with ``overrides`` (field=value or variant:field=value) applied."""
  module = FAMILIES[family]
  configs = {}
  for v in variants:
    configs[v] = module.get_config(v)
    for item in overrides:
      target, sep, rest = item.partition(":")
      if sep and "=" not in target:  # variant:field=value
        if target not in module.VARIANTS:
          raise ValueError(f"--override {item!r}: unknown {family} variant {target!r}; "
                           f"allowed: {module.VARIANTS}")
        if target == v:
          config_lib.override(configs[v], rest)
      else:
        config_lib.override(configs[v], item)
  return configs


def status_table(workdir: str, module, variants) -> str:
  """Each variant's progress so far, from its metrics.jsonl and calls.jsonl."""
  lines = ["| variant | episodes | stage | episode steps | last validation | training time "
           "| calls | devices | done |", "|---" * 9 + "|"]
  for v in variants:
    rows = metrics.read_rows(os.path.join(workdir, v, "metrics.jsonl"))
    calls = metrics.read_rows(os.path.join(workdir, v, "calls.jsonl"))
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    last = rows[-1] if rows else {}
    lines.append(
        f"| {module.NAMES[v]} | {len(rows)} | {last.get('stage', '')} | "
        f"{last.get('episode_steps', '')} | {vals[-1] if vals else float('nan'):.4g} | "
        f"{sum(r['seconds'] for r in rows) / 60:.1f} min | {len(calls)} | "
        f"{', '.join(sorted({c['device'] for c in calls}))} | "
        f"{'yes' if os.path.exists(os.path.join(workdir, v, 'theta.msgpack')) else 'no'} |")
  return "\n".join(lines) + "\n"


def _seconds_left(started: float):
  """What is left of --max_minutes since ``started`` (None: no limit)."""
  if _MAX_MINUTES.value is None:
    return None
  return max(0.0, 60.0 * _MAX_MINUTES.value - (time.perf_counter() - started))


def train_variants(module, configs: dict, optimizee, keys, steps: int, started: float,
                   should_stop) -> tuple:
  """Trains (or resumes) each variant and evaluates it; exits with
  trainer.EXIT_PAUSED when --max_minutes or SIGTERM stops a training."""
  results, curves = {}, {}
  for v, config in configs.items():
    t0 = time.perf_counter()
    res = trainer.train(config, os.path.join(_WORKDIR.value, v), progress=False,
                        max_seconds=_seconds_left(started), should_stop=should_stop)
    wall = time.perf_counter() - t0
    if not res.finished:
      print(f"{module.NAMES[v]}: paused at episode {res.episodes}; run the same command "
            f"again to go on", flush=True)
      sys.exit(trainer.EXIT_PAUSED)
    rows = metrics.read_rows(os.path.join(res.workdir, "metrics.jsonl"))
    # calls.jsonl is absent in runs made before it
    calls = metrics.read_rows(os.path.join(res.workdir, "calls.jsonl"))
    learned = cached_curves(os.path.join(_WORKDIR.value, f"curves_{v}"),
                            {"episodes": res.episodes, "best_val": res.best_score},
                            res.lopt.transform(res.theta), optimizee, keys, steps)
    name = module.NAMES[v]
    curves[name] = learned
    results[name] = {
        "variant": v, "episodes": res.episodes, "best_val": res.best_score,
        "final_stage": rows[-1]["stage"] if rows else 0,
        "imitation_episodes": sum(r["mode"] == "imitation" for r in rows),
        "train_seconds": float(sum(r["seconds"] for r in rows)), "wall_seconds_this_call": wall,
        "train_calls": len(calls), "train_devices": sorted({c["device"] for c in calls}),
        "ln_loss": ln_at(learned, REPORT_STEPS + (steps,)),
        "paper_ln_loss_10k": module.PAPER_LN_LOSS_10K.get(v)}
    print(f"{name}: {res.episodes} episodes, {results[name]['train_seconds']:.0f} s, "
          f"ln loss {results[name]['ln_loss']}", flush=True)
  return results, curves


def untrained_row(module, config, optimizee, keys, steps: int) -> tuple:
  """(name, evaluation curves) of ``config``'s model at the theta its training starts from."""
  tx = trainer.build_model(config).transform(trainer.initial_theta(config))
  # a JSON round trip: the cached tag compares equal to a fresh one (tuples become lists)
  tag = json.loads(json.dumps({"untrained": config.model.to_dict(), "seed": config.seed}))
  return (f"{module.NAMES[module.VARIANTS[0]]}, untrained",
          cached_curves(os.path.join(_WORKDIR.value, "curves_untrained"), tag, tx, optimizee,
                        keys, steps))


def train_in_processes(variants, started: float) -> None:
  """Trains the unfinished ``variants`` in up to --processes child processes at once.

  One small meta-batch per process leaves most of an accelerator idle; several
  processes sharing it keep it busy (on an H200, seven at B = 8 together moved
  about as many optimizee-steps per second as one process at B = 64). Returns
  when all have finished; exits with trainer.EXIT_PAUSED if any paused
  (--max_minutes, or a SIGTERM, which is passed on to the children).
  """
  todo = [v for v in variants
          if not os.path.exists(os.path.join(_WORKDIR.value, v, "theta.msgpack"))]
  env = dict(os.environ)
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / _PROCESSES.value:.3f}")
  running, paused, failed = {}, [], []

  def forward_sigterm(signum, frame):
    del frame
    paused.extend(todo)  # not started: they stay for the next call
    todo.clear()
    for proc in running.values():
      proc.send_signal(signum)

  previous = signal.signal(signal.SIGTERM, forward_sigterm)
  try:
    while todo or running:
      while todo and len(running) < _PROCESSES.value:
        v = todo.pop(0)
        extra = [f"--variants={v}", "--processes=1", "--notable"]
        left = _seconds_left(started)
        if left is not None:
          if left == 0 and _MAX_MINUTES.value > 0:  # the time is up before it started
            paused.append(v)
            continue
          extra.append(f"--max_minutes={left / 60.0}")
        with open(os.path.join(_WORKDIR.value, f"{v}.log"), "a") as log:
          running[v] = subprocess.Popen(
              [sys.executable, "-m", "experiments.ablation", *sys.argv[1:], *extra],
              stdout=log, stderr=subprocess.STDOUT, env=env)
        print(f"{v}: training in its own process, log {_WORKDIR.value}/{v}.log", flush=True)
      time.sleep(0.5)
      for v, proc in list(running.items()):
        if proc.poll() is None:
          continue
        del running[v]
        if proc.returncode == trainer.EXIT_PAUSED:
          paused.append(v)
        elif proc.returncode != 0:
          failed.append(v)
  finally:
    signal.signal(signal.SIGTERM, previous)
  if failed:
    sys.exit(f"ablation: training failed for {failed}; see their logs in {_WORKDIR.value}")
  if paused:
    print(f"paused: {paused}; run the same command again to go on", flush=True)
    sys.exit(trainer.EXIT_PAUSED)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  started = time.perf_counter()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  if _PROCESSES.value < 1:
    raise app.UsageError(f"--processes must be >= 1, got {_PROCESSES.value}")
  # this process's (the children get the flag too)
  kernel_constants.set_from_command_line(_KERNEL_CONSTANTS.value)
  module = FAMILIES[_FAMILY.value]
  variants = _VARIANTS.value or list(module.PAPER_LN_LOSS_10K)
  configs = build_configs(_FAMILY.value, variants, _OVERRIDES.value)
  if _STATUS.value:
    print(status_table(_WORKDIR.value, module, variants), end="")
    return
  if _PROCESSES.value > 1:  # before this process touches the device: the children need it
    train_in_processes(variants, started)
  base = configs[variants[0]]
  steps = _EVAL_STEPS.value or base.eval.steps
  n = _EVAL_N.value or base.eval.num_optimizees
  optimizee = trainer.build_optimizee(base)
  keys = jax.random.split(jax.random.PRNGKey(base.eval.seed), n)
  machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
            f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
  print(f"ablation: {variants}, eval {n} optimizees x {steps} steps; {machine}")

  with trainer.sigterm_requests_stop() as should_stop:  # SIGTERM pauses like --max_minutes
    results, curves = train_variants(module, configs, optimizee, keys, steps, started,
                                     should_stop)
  if not _TABLE.value:
    return

  if _UNTRAINED.value:
    name, row = untrained_row(module, base, optimizee, keys, steps)
    curves[name] = row
    results[name] = {"untrained": True, "ln_loss": ln_at(row, REPORT_STEPS + (steps,))}
    print(f"{name}: ln loss {results[name]['ln_loss']}", flush=True)

  lrs = tuple(base.eval.adam_learning_rates)
  tuned = evaluation.tune_learning_rate(optax.adam, optimizee, keys, steps, lrs)
  adam = evaluation.curves(optax.adam(tuned.learning_rate), optimizee, keys, steps)
  name = f"Adam (lr {tuned.learning_rate:g})"
  curves[name] = adam
  results[name] = {"learning_rate": tuned.learning_rate, "grid": tuned.scores,
                   "ln_loss": ln_at(adam, REPORT_STEPS + (steps,))}
  report = sorted({s for s in REPORT_STEPS + (steps,) if s <= steps})
  caption = (f"Mean ln(training loss) on {n} fresh {base.optimizee.name} optimizees, "
             f"{steps:,} evaluation steps. {_LABEL.value} Machine: {machine}.")
  with open(os.path.join(_WORKDIR.value, "ablation.md"), "w") as f:
    f.write(table(results, report, caption))
  with open(os.path.join(_WORKDIR.value, "ablation.json"), "w") as f:
    json.dump({"machine": machine, "overrides": _OVERRIDES.value, "eval_steps": steps,
               "eval_optimizees": n, "results": results}, f, indent=2)
  plots.plot_curves(os.path.join(_WORKDIR.value, "ablation.png"), curves,
                    title=f"{base.optimizee.name}: {n} fresh optimizees")
  print(open(os.path.join(_WORKDIR.value, "ablation.md")).read())


if __name__ == "__main__":
  define_flags()
  hugepages.ensure()  # before any work: it re-executes the process
  app.run(main)
