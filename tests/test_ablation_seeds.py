"""The ablation summarised over seeds: statistics, refused mixtures of settings, the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import ablation_seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["meta.batch_size=1", "dm:meta.num_episodes=500", "dm_aug:meta.num_episodes=100"]


def _report(seed, dm, dm_cl=None, adam=(-0.8, -2.6), overrides=BASE):
  def learned(variant, values):
    return {"variant": variant, "train_seconds": 600.0,
            "ln_loss": {"100": values[0], "2000": values[1]}}
  results = {"DM": learned("dm", dm)}
  if dm_cl is not None:
    results["DM-CL"] = learned("dm_cl", dm_cl)
  results["Adam (lr 0.01)"] = {"learning_rate": 0.01,
                               "ln_loss": {"100": adam[0], "2000": adam[1]}}
  seed_override = [] if seed is None else [f"seed={seed}"]
  return {"eval_steps": 2000, "eval_optimizees": 10,
          "overrides": [*overrides, f"data.path=/data{seed}/mnist.npz", *seed_override],
          "results": results}


def test_mean_sample_std_and_seeds_below_the_baseline():
  reports = [_report(None, (-1.0, -1.0), (-0.5, -3.0)), _report(1, (-2.0, -3.0)),
             _report(2, (-1.5, -2.9), (-0.7, -2.0))]
  summary = ablation_seeds.summarize(reports)
  assert summary["seeds"] == [0, 1, 2] and summary["steps"] == [100, 2000]
  dm = summary["optimizers"]["DM"]
  np.testing.assert_allclose(dm["mean"][2000], -6.9 / 3)
  np.testing.assert_allclose(dm["std"][2000], np.std([-1.0, -3.0, -2.9], ddof=1))
  assert dm["last"] == {0: -1.0, 1: -3.0, 2: -2.9}
  assert dm["below_baseline"] == 2  # -3.0 and -2.9 < -2.6
  cl = summary["optimizers"]["DM-CL"]  # absent from seed 1's run
  assert cl["seeds"] == [0, 2] and cl["below_baseline"] == 1
  np.testing.assert_allclose(cl["mean"][100], -0.6)
  table = ablation_seeds.table(summary)
  assert "| DM | 3 | -1.50 ± 0.50 | -2.30 ± 1.13 | -1.00 | -3.00 | -2.90 | 2 of 3 |" in table
  assert "| DM-CL | 2 |" in table and "| -3.00 |  | -2.00 | 1 of 2 |" in table


def test_runs_that_differ_in_more_than_the_seed_are_refused():
  with pytest.raises(ValueError, match=r"seed 1's run differs .* in overrides"):
    ablation_seeds.summarize([_report(0, (-1, -1)),
                              _report(1, (-1, -1), overrides=["meta.batch_size=8"])])
  with pytest.raises(ValueError, match="same seed"):
    ablation_seeds.summarize([_report(3, (-1, -1)), _report(3, (-2, -2))])
  with pytest.raises(ValueError, match="baselines differ"):
    ablation_seeds.summarize([_report(0, (-1, -1)), _report(1, (-1, -1), adam=(-0.8, -2.7))])
  with pytest.raises(ValueError, match="at least 2"):
    ablation_seeds.summarize([_report(0, (-1, -1))])
  # A variant's own override counts only where both runs have that variant: seed 0's
  # DM-AUG override does not stop it from being compared with a run without DM-AUG.
  with_aug = _report(0, (-1, -1))
  with_aug["results"]["DM-AUG"] = {"variant": "dm_aug", "train_seconds": 1.0,
                                   "ln_loss": {"100": 0.8, "2000": 0.8}}
  without = _report(1, (-1, -1), overrides=BASE[:2])
  assert ablation_seeds.summarize([with_aug, without])["optimizers"]["DM-AUG"]["seeds"] == [0]


def test_command_line_writes_table_json_and_plot(tmp_path):
  folders = []
  for seed, dm in ((0, (-1.0, -1.0)), (1, (-2.0, -3.0))):
    folder = tmp_path / f"seed{seed}"
    folder.mkdir()
    (folder / "ablation.json").write_text(json.dumps(_report(seed, dm)))
    folders.append(str(folder))
  out = tmp_path / "out"
  subprocess.run([sys.executable, "-m", "experiments.ablation_seeds", f"--out={out}",
                  *folders], cwd=ROOT, check=True, capture_output=True)
  assert "| DM | 2 | -1.50 ± 0.71 | -2.00 ± 1.41 | -1.00 | -3.00 | 1 of 2 |" in \
      (out / "seeds.md").read_text()
  assert json.loads((out / "seeds.json").read_text())["folders"] == folders
  assert (out / "seeds.png").stat().st_size > 0
  missing = subprocess.run([sys.executable, "-m", "experiments.ablation_seeds", f"--out={out}",
                            str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
  assert missing.returncode != 0 and "ablation.json does not exist" in missing.stderr


def test_an_untrained_reference_row_is_summarized_like_a_variant():
  reports = [_report(None, (-1.0, -1.0)), _report(1, (-2.0, -3.0))]
  for seed, r in enumerate(reports):  # ablation --untrained: no variant, no training time
    r["results"]["DM, untrained"] = {"untrained": True,
                                     "ln_loss": {"100": 0.8, "2000": 0.7 - 0.1 * seed}}
  summary = ablation_seeds.summarize(reports)
  untrained = summary["optimizers"]["DM, untrained"]
  assert untrained["seeds"] == [0, 1] and untrained["train_minutes"] == {}
  np.testing.assert_allclose(untrained["mean"][2000], 0.65)
  assert untrained["below_baseline"] == 0
  assert summary["optimizers"]["DM"]["train_minutes"] == {0: 10.0, 1: 10.0}
  assert "| DM, untrained | 2 |" in ablation_seeds.table(summary)
