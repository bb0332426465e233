"""Training under a time limit: pause (checkpoint, exit 75), resume, same theta."""
import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from l2ojax.meta import trainer
from tests.helpers.configs import tiny_quadratic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config():  # pauses at episodes 1-3 fall off the checkpoint period (4)
  return tiny_quadratic(episodes=5, checkpoint_every=4, validation_period=2)


def test_max_seconds_pauses_after_one_episode_and_resumes_to_the_same_theta(tmp_path):
  full = trainer.train(_tiny_config(), str(tmp_path / "full"), progress=False)
  workdir = tmp_path / "paused"
  for episode in (1, 2, 3):  # a pause saves its own checkpoint
    res = trainer.train(_tiny_config(), str(workdir), progress=False, max_seconds=0.0)
    assert not res.finished and res.episodes == episode
    assert not (workdir / "theta.msgpack").exists()
  res = trainer.train(_tiny_config(), str(workdir), progress=False)
  assert res.finished and res.episodes == 5 and (workdir / "theta.msgpack").exists()
  chex.assert_trees_all_equal(full.theta, res.theta)  # bitwise, on CPU
  assert res.best_score == full.best_score
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["episode"] for r in rows] == list(range(5))
  calls = [json.loads(l) for l in open(workdir / "calls.jsonl")]
  assert [c["episodes"] for c in calls] == [[0, 1], [1, 2], [2, 3], [3, 5]]
  assert [c["finished"] for c in calls] == [False, False, False, True]


def test_negative_max_seconds_is_refused(tmp_path):
  with pytest.raises(ValueError, match="max_seconds"):
    trainer.train(_tiny_config(), str(tmp_path), progress=False, max_seconds=-1.0)


def _run(args, timeout=600):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})


def test_train_cli_exits_75_when_paused_and_evaluates_only_when_done(tmp_path):
  flags = ["--config=experiments/configs/dm_quadratic.py", f"--workdir={tmp_path}",
           "--config.meta.num_episodes=3", "--config.meta.batch_size=4",
           "--config.validation.period=3", "--config.validation.num_optimizees=4",
           "--config.eval.num_optimizees=2", "--config.eval.steps=10"]
  out = _run(["experiments.train", *flags, "--max_minutes=0"])
  assert out.returncode == 75, out.stderr[-2000:]
  assert "paused after episode 1 of 3" in out.stdout
  assert not (tmp_path / "eval.json").exists()
  out = _run(["experiments.train", *flags])
  assert out.returncode == 0, out.stderr[-2000:]
  assert "resumed from episode 1" in out.stdout and (tmp_path / "eval.json").exists()


def test_ablation_of_another_family_pauses_resumes_and_writes_its_table(tmp_path,
                                                                        tiny_image_npz):
  args = ["experiments.ablation", "--family=rnnprop", f"--workdir={tmp_path}",
          "--eval_steps=30", "--eval_optimizees=2", "--label=tiny",
          f"--override=data.path={tiny_image_npz}", "--override=meta.num_episodes=2",
          "--override=meta.batch_size=2", "--override=meta.episode_steps=20",
          "--override=curriculum.schedule=(20, 40)", "--override=validation.period=1",
          "--override=validation.num_optimizees=2", "--override=eval.adam_learning_rates=(0.01,)"]
  out = _run([*args, "--max_minutes=0"])
  assert out.returncode == 75, out.stderr[-2000:]
  assert "RNNProp: paused at episode 1" in out.stdout
  assert not (tmp_path / "ablation.md").exists()
  status = _run([*args, "--status"])
  assert "| RNNProp | 1 | 0 | 20 |" in status.stdout, status.stdout
  assert "| RNNProp-CL-IL | 0 |" in status.stdout, status.stdout
  out = _run([*args, "--untrained"])
  assert out.returncode == 0, out.stderr[-2000:]
  table = (tmp_path / "ablation.md").read_text()
  # the paper's figures for RNNProp (-6) and RNNProp-CL-IL (-10.5) beside ours
  assert "| RNNProp | " in table and "~-6 |" in table
  assert "| RNNProp-CL-IL | " in table and "~-10.5 |" in table
  result = json.load(open(tmp_path / "ablation.json"))["results"]
  assert result["RNNProp"]["train_calls"] == 2 and result["RNNProp-CL-IL"]["train_calls"] == 1
  assert all(np.isfinite(result[n]["ln_loss"]["30"]) for n in ("RNNProp", "RNNProp-CL-IL"))
  # the reference row: the model before meta-training, on the same optimizees
  assert "| RNNProp, untrained | " in table and result["RNNProp, untrained"]["untrained"]
  untrained, trained = (np.load(tmp_path / f"curves_{v}.npy") for v in ("untrained", "rnnprop"))
  assert untrained.shape == trained.shape == (2, 31)
  np.testing.assert_array_equal(untrained[:, 0], trained[:, 0])
  assert not np.array_equal(untrained[:, -1], trained[:, -1])


def test_ablation_trains_variants_in_parallel_processes_that_pause_and_resume(tmp_path,
                                                                            tiny_image_npz):
  args = ["experiments.ablation", "--variants=dm,dm_il", "--processes=2",
          f"--workdir={tmp_path}", "--eval_steps=20", "--eval_optimizees=2",
          f"--override=data.path={tiny_image_npz}", "--override=meta.num_episodes=2",
          "--override=meta.batch_size=2", "--override=meta.episode_steps=20",
          "--override=validation.period=1", "--override=validation.num_optimizees=2",
          "--override=eval.adam_learning_rates=(0.01,)",
          # a fused kernel's tunable (unused off a GPU) reaches every process
          "--kernel_constant=lstm_kernel.EXP2_TANH=1"]
  out = _run([*args, "--max_minutes=0"])
  assert out.returncode == 75, out.stdout[-2000:] + out.stderr[-2000:]
  assert not (tmp_path / "ablation.md").exists()
  for v in ("dm", "dm_il"):
    log = (tmp_path / f"{v}.log").read_text()
    assert "paused at episode 1" in log
    assert "kernel constants: {'lstm_kernel.EXP2_TANH': 1}" in log
  out = _run(args)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  table = (tmp_path / "ablation.md").read_text()
  assert "| DM | " in table and "| DM-IL | " in table
  # the second calls of the two variants ran at the same time
  spans = []
  for v in ("dm", "dm_il"):
    last = [json.loads(l) for l in open(tmp_path / v / "calls.jsonl")][-1]
    assert last["episodes"] == [1, 2] and last["finished"]
    spans.append((last["ended"] - last["seconds"], last["ended"]))
  (start_a, end_a), (start_b, end_b) = spans
  overlap = min(end_a, end_b) - max(start_a, start_b)
  assert overlap > 0.5 * min(end_a - start_a, end_b - start_b) > 0, spans


@pytest.mark.parametrize("module", ["experiments.train", "experiments.ablation"])
def test_a_bad_kernel_constant_is_named_before_anything_runs(module, tmp_path):
  out = _run([module, f"--workdir={tmp_path}", "--kernel_constant=lstm_kernel.NO_SUCH=1"])
  assert out.returncode != 0 and "lstm_kernel.NO_SUCH=1" in out.stderr, out.stderr[-2000:]
  assert not any(tmp_path.iterdir())
