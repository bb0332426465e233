r"""One table and one plot over several seeds of the same ablation.

Each ``experiments.ablation`` run writes ``ablation.json`` for one seed; this
reads several and reports, per learned optimizer and step, the mean and the
sample standard deviation of ln(training loss) over seeds, each seed's value
at the last step and in how many seeds the learned optimizer ended below the
tuned baseline. The runs must differ in their seed alone (same evaluation
steps, optimizees and other overrides), or the comparison would mix budgets.

  python -m experiments.ablation_seeds --out=runs/ablation_seeds \
    runs/ablation_cpu runs/ablation_cpu_seed1 runs/ablation_cpu_seed2
"""

import json
import os
import re
from typing import Mapping, Sequence

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
_SEED = re.compile(r"^seed=(\d+)$")


def _seed(report: Mapping) -> int:
  seeds = [int(m.group(1)) for o in report["overrides"] if (m := _SEED.match(o))]
  return seeds[-1] if seeds else 0  # the configs' default seed


def _variants(report: Mapping) -> set:
  return {res["variant"] for res in report["results"].values() if "variant" in res}


def _setting(report: Mapping, variants: set) -> dict:
  """What must agree between runs: everything but the seed, the data's location and
  the overrides of variants outside ``variants``."""
  def kept(o):
    target, sep, _ = o.partition(":")
    if sep and "=" not in target:  # variant:field=value
      return target in variants
    return not _SEED.match(o) and not o.startswith("data.path=")
  return {"eval_steps": report["eval_steps"], "eval_optimizees": report["eval_optimizees"],
          "overrides": sorted(o for o in report["overrides"] if kept(o))}


def _is_baseline(result: Mapping) -> bool:
  return "learning_rate" in result


def summarize(reports: Sequence[Mapping]) -> dict:
  """Per optimizer and step, ln losses over the runs in ``reports`` (ablation.json contents).

  Raises ValueError when two runs share a seed or differ in anything but it.
  """
  if len(reports) < 2:
    raise ValueError(f"need the reports of at least 2 seeds, got {len(reports)}")
  seeds = [_seed(r) for r in reports]
  if len(set(seeds)) != len(seeds):
    raise ValueError(f"two reports have the same seed: {seeds}")
  for seed, r in zip(seeds[1:], reports[1:]):
    common = _variants(reports[0]) & _variants(r)
    first, setting = _setting(reports[0], common), _setting(r, common)
    for field in first:
      if setting[field] != first[field]:
        raise ValueError(f"seed {seed}'s run differs from seed {seeds[0]}'s in {field}: "
                         f"{setting[field]} vs {first[field]}")
  steps = sorted({int(s) for r in reports for res in r["results"].values()
                  for s in res["ln_loss"]})
  last = steps[-1]
  # The evaluation optimizees do not depend on the seed, so neither does the tuned
  # baseline: a difference means the runs were evaluated differently.
  baselines = [(name, res) for r in reports for name, res in r["results"].items()
               if _is_baseline(res)]
  if len(baselines) != len(reports):
    raise ValueError(f"each run needs one tuned baseline; found {len(baselines)} in "
                     f"{len(reports)} runs")
  baseline_name, baseline = baselines[0]
  for name, res in baselines[1:]:
    if name != baseline_name or any(abs(res["ln_loss"][s] - v) > 1e-3
                                    for s, v in baseline["ln_loss"].items()):
      raise ValueError(f"the runs' tuned baselines differ: {baseline_name} "
                       f"{baseline['ln_loss']} vs {name} {res['ln_loss']}")
  names = [n for n in reports[0]["results"] if not _is_baseline(reports[0]["results"][n])]
  for r in reports[1:]:
    names += [n for n in r["results"] if n not in names and not _is_baseline(r["results"][n])]

  optimizers = {}
  for name in names:
    per_seed = {seed: r["results"][name] for seed, r in zip(seeds, reports)
                if name in r["results"]}
    values = {s: np.array([res["ln_loss"][str(s)] for res in per_seed.values()])
              for s in steps}
    optimizers[name] = {
        "seeds": list(per_seed),
        "mean": {s: float(v.mean()) for s, v in values.items()},
        "std": {s: float(v.std(ddof=1)) if len(v) > 1 else float("nan")
                for s, v in values.items()},
        "last": {seed: res["ln_loss"][str(last)] for seed, res in per_seed.items()},
        "below_baseline": int(sum(res["ln_loss"][str(last)] < baseline["ln_loss"][str(last)]
                                  for res in per_seed.values())),
        "train_minutes": {seed: res["train_seconds"] / 60 for seed, res in per_seed.items()
                          if "train_seconds" in res}}  # an untrained row has none
  return {"seeds": seeds, "steps": steps,
          "setting": _setting(reports[0], _variants(reports[0])), "optimizers": optimizers,
          "baseline": {"name": baseline_name,
                       "ln_loss": {s: baseline["ln_loss"][str(s)] for s in steps}}}


def table(summary: Mapping) -> str:
  """Markdown: mean ± sd per step, each seed at the last step, seeds below the baseline."""
  steps, last = summary["steps"], summary["steps"][-1]
  seeds = summary["seeds"]
  head = " | ".join(f"step {s:,}" for s in steps)
  per_seed = " | ".join(f"seed {s}" for s in seeds)
  lines = [f"Mean ± sample standard deviation over seeds of the mean ln(training loss); "
           f"each seed's value at step {last:,}; in how many seeds the learned optimizer "
           f"ended below {summary['baseline']['name']}.", "",
           f"| optimizer | seeds | {head} | {per_seed} | below {summary['baseline']['name']} |",
           "|---" * (len(steps) + len(seeds) + 3) + "|"]
  for name, o in summary["optimizers"].items():
    cells = " | ".join(f"{o['mean'][s]:.2f}" + (f" ± {o['std'][s]:.2f}" if len(o["seeds"]) > 1
                                                  else "") for s in steps)
    each = " | ".join(f"{o['last'][s]:.2f}" if s in o["last"] else "" for s in seeds)
    lines.append(f"| {name} | {len(o['seeds'])} | {cells} | {each} | "
                 f"{o['below_baseline']} of {len(o['seeds'])} |")
  base = summary["baseline"]
  cells = " | ".join(f"{base['ln_loss'][s]:.2f}" for s in steps)
  lines.append(f"| {base['name']} | | {cells} |{' |' * len(seeds)} |")
  return "\n".join(lines) + "\n"


def plot(path: str, summary: Mapping) -> None:
  """Each seed's ln loss at the last step per optimizer, the mean and the baseline's level."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  last = summary["steps"][-1]
  names = list(summary["optimizers"])
  fig, ax = plt.subplots(figsize=(6, 4))
  for i, name in enumerate(names):
    o = summary["optimizers"][name]
    values = [o["last"][s] for s in o["seeds"]]
    ax.scatter(np.full(len(values), i), values, color="C0", alpha=0.7)
    ax.hlines(o["mean"][last], i - 0.25, i + 0.25, color="C1")
  ax.axhline(summary["baseline"]["ln_loss"][last], color="gray", linestyle="--",
             label=summary["baseline"]["name"])
  ax.set_xticks(range(len(names)), names)
  ax.set_ylabel(f"ln(training loss) at step {last:,}")
  ax.set_title(f"{len(summary['seeds'])} seeds: each seed (dots) and the mean (bars)")
  ax.legend()
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def define_flags() -> None:
  """The command line, defined only when run as a program: experiments.benchmark, which
  a process may import beside this module, has an --out too."""
  flags.DEFINE_string("out", None, "Folder for seeds.{md,json,png}.", required=True)


def main(argv):
  folders = argv[1:]
  if not folders:
    raise app.UsageError("name the ablation folders (each with an ablation.json)")
  reports = []
  for folder in folders:
    path = os.path.join(folder, "ablation.json")
    if not os.path.exists(path):
      raise app.UsageError(f"{path} does not exist: run experiments.ablation there first")
    with open(path) as f:
      reports.append(json.load(f))
  summary = summarize(reports)
  os.makedirs(FLAGS.out, exist_ok=True)
  with open(os.path.join(FLAGS.out, "seeds.md"), "w") as f:
    f.write(table(summary))
  with open(os.path.join(FLAGS.out, "seeds.json"), "w") as f:
    json.dump({"folders": folders, **summary}, f, indent=2)
  plot(os.path.join(FLAGS.out, "seeds.png"), summary)
  print(table(summary), end="")


if __name__ == "__main__":
  define_flags()
  app.run(main)
