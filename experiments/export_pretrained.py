r"""Ships a trained optimizer as a pretrained one: weights plus a model card.

  python -m experiments.export_pretrained --workdir=runs/dm_cl_il_mnist \
      --name=dm_cl_il_mnist --evaluation=docs/pretrained/dm_cl_il_mnist

Reads WORKDIR/theta.msgpack, config.json and metrics.jsonl (written by
``experiments.train``) and, with --evaluation, the eval_summary.md/.json that
``experiments.evaluate`` wrote there. Writes DIRECTORY/NAME.msgpack (the
weights, with the config, commit and training record in its info) and
DIRECTORY/NAME.md (the model card); DIRECTORY defaults to l2ojax/pretrained.
"""
import datetime
import json
import os
import platform
import re
import subprocess

import jax
from absl import app, flags

from l2ojax import checkpoints, pretrained


def define_flags() -> None:
  """The command line's flags, defined when run as a program (experiments modules
  share flag names such as workdir: importing several in one process must work)."""
  global _WORKDIR, _NAME, _DESCRIPTION, _EVALUATION, _DIRECTORY, _MACHINE
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training run folder.")
  _NAME = flags.DEFINE_string("name", None, "Name to ship it under (lower case, digits, _).")
  _DESCRIPTION = flags.DEFINE_string("description", "", "One line for the top of the card.")
  _EVALUATION = flags.DEFINE_string("evaluation", "",
                                    "Folder of an experiments.evaluate run of it.")
  _DIRECTORY = flags.DEFINE_string("directory", pretrained.DIRECTORY, "Where to write.")
  _MACHINE = flags.DEFINE_string("machine", "", "Machine it was trained on (default: this one).")


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True, cwd=os.path.dirname(__file__)).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def training_record(workdir: str) -> dict:
  """Episodes, stages, imitation episodes and wall time from metrics.jsonl."""
  rows = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return {"episodes": len(rows),
          "imitation_episodes": sum(r.get("mode") == "imitation" for r in rows),
          "optimizee_steps": sum(r.get("episode_steps", 0) for r in rows),
          "stages_reached": sorted({r.get("stage", 0) for r in rows}),
          "seconds": round(sum(r.get("seconds", 0.0) for r in rows), 1)}


def _short(x) -> str:
  return f"{x:.4g}" if isinstance(x, (int, float)) else str(x)


def card_text(name: str, lopt, info: dict, config: dict, evaluation: str) -> str:
  rec, opt = info["training"], config.get("optimizee", {})
  lines = [f"# `{name}`", ""]
  if info.get("description"):
    lines += [info["description"], ""]
  lines += [
      "```python", "import l2ojax", f'tx = l2ojax.pretrained.load("{name}")  # optax', "```", "",
      "## Training", "",
      f"- model: `{lopt.name}` with options `{lopt.options()}`",
      f"- trained on: `{opt.get('name')}` with options `{opt.get('options', {})}`, data "
      f"`{config.get('data', {})}`",
      f"- meta-training: {rec['episodes']} episodes ({rec['imitation_episodes']} of them "
      f"imitation), {rec['optimizee_steps']} optimizee steps, curriculum stages reached "
      f"{rec['stages_reached']}, {rec['seconds'] / 60:.1f} min on {info['machine']}",
      f"- kept: the theta with the best validation score ({_short(info.get('best_val_loss'))}); "
      f"training ended at curriculum stage {info.get('stage')}",
      f"- commit `{info['commit']}`, exported {info['exported']}", "",
      "Reproduce: `python -m experiments.train` with the config below "
      "(`--config` file plus overrides), then `python -m experiments.export_pretrained`.", "",
      "<details><summary>config</summary>", "", "```json", json.dumps(config, indent=1,
                                                                       sort_keys=True),
      "```", "</details>", ""]
  if evaluation:
    lines += ["## Measured", "", evaluation.strip(), ""]
  return "\n".join(lines)


def main(argv):
  del argv
  name, workdir = _NAME.value, _WORKDIR.value
  if not re.fullmatch(r"[a-z0-9_]+", name or ""):
    raise app.UsageError(f"--name={name!r}: use lower case letters, digits and _")
  lopt, theta, info = checkpoints.load_theta(os.path.join(workdir, "theta.msgpack"))
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise app.UsageError(f"{config_path} is missing: train with experiments.train, which "
                         "writes it")
  with open(config_path) as f:
    config = json.load(f)
  evaluation = ""
  if _EVALUATION.value:
    with open(os.path.join(_EVALUATION.value, "eval_summary.md")) as f:
      evaluation = f.read()
    figures = sorted(p for p in os.listdir(_EVALUATION.value) if p.endswith(".png"))
    evaluation += "\n" + "\n".join(
        # Links relative to the card, so they resolve wherever the repository is viewed.
        f"![{p[5:-4]}]({os.path.relpath(os.path.join(_EVALUATION.value, p), _DIRECTORY.value)})"
        for p in figures)
  info = {**info, "name": name, "description": _DESCRIPTION.value, "config": config,
          "commit": _commit(), "exported": datetime.date.today().isoformat(),
          "machine": _MACHINE.value or f"{platform.machine()} {jax.default_backend()}, "
                                       f"{os.cpu_count()} cores",
          "training": training_record(workdir)}
  os.makedirs(_DIRECTORY.value, exist_ok=True)
  checkpoints.save_theta(os.path.join(_DIRECTORY.value, f"{name}.msgpack"), lopt, theta, info)
  with open(os.path.join(_DIRECTORY.value, f"{name}.md"), "w") as f:
    f.write(card_text(name, lopt, info, config, evaluation))
  print(f"wrote {_DIRECTORY.value}/{name}.msgpack and {name}.md")


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "name"])
  app.run(main)
