import json
import os
import subprocess
import sys

import chex
import numpy as np
import pytest

from experiments.configs import dm_mnist, dm_quadratic
from l2ojax import checkpoints
from l2ojax.meta import trainer
from tests.helpers.configs import tiny_quadratic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _small_quadratic(episodes=120):
  c = dm_quadratic.get_config()
  c.meta.batch_size = 16
  c.meta.num_episodes = episodes
  c.validation.period = 20
  c.validation.num_optimizees = 16
  c.checkpoint_every = 40
  c.eval.num_optimizees = 32
  return c


def test_main_job_beats_tuned_adam_at_reduced_scale(tmp_path):
  """The issue's claim at reduced scale, through the real command line."""
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--workdir={workdir}",
       "--config=experiments/configs/dm_quadratic.py", "--config.meta.num_episodes=150",
       "--config.meta.batch_size=16", "--config.eval.num_optimizees=32",
       "--override=model.options.lstm_kernel=xla"],  # a key the config does not list
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "learned" in out.stdout and "Adam" in out.stdout
  summary = json.load(open(workdir / "eval.json"))
  assert summary["learned_final_loss"] < summary["adam_final_loss"], summary
  assert summary["adam_learning_rate"] in dm_quadratic.ADAM_LEARNING_RATES
  assert json.load(open(workdir / "config.json"))["model"]["options"]["lstm_kernel"] == "xla"
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["episode"] for r in rows] == list(range(150))
  assert {"episode", "train_loss", "stage", "mode"} <= set(rows[0])
  assert any("val_loss" in r for r in rows)
  for name in ("theta.msgpack", "eval.png", "checkpoints"):
    assert (workdir / name).exists(), name
  with open(workdir / "eval.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_resume_continues_where_the_checkpoint_left_off(tmp_path):
  c = _small_quadratic(episodes=40)
  full = trainer.train(c, str(tmp_path / "full"), progress=False)
  c_half = _small_quadratic(episodes=40)
  # Stops at a checkpoint boundary (checkpoint_every 40 -> final save).
  c_half.meta.num_episodes = 20
  trainer.train(c_half, str(tmp_path / "resumed"), progress=False)
  resumed = trainer.train(c, str(tmp_path / "resumed"), progress=False)
  _, t_full, _ = checkpoints.load_theta(str(tmp_path / "full" / "theta.msgpack"))
  _, t_res, _ = checkpoints.load_theta(str(tmp_path / "resumed" / "theta.msgpack"))
  for a, b in zip(*map(lambda t: __import__("jax").tree_util.tree_leaves(t), (t_full, t_res))):
    np.testing.assert_array_equal(a, b)
  rows = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [r["episode"] for r in rows] == list(range(40))
  assert resumed.episodes == full.episodes == 40


def test_mnist_config_trains_on_local_npz(tmp_path, tiny_image_npz):
  c = dm_mnist.get_config()
  c.data.path = tiny_image_npz
  c.meta.batch_size = 2
  c.meta.num_episodes = 2
  c.meta.episode_steps = 40
  c.validation.period = 2
  c.validation.num_optimizees = 2
  c.validation.steps = 20
  result = trainer.train(c, str(tmp_path), progress=False)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert len(rows) == 2 and np.isfinite(rows[-1]["val_loss"])
  assert np.isfinite(result.best_score)


def test_sharded_training_on_one_device_gives_the_unsharded_theta(tmp_path):
  """meta.shard: a mesh of the one CPU device, each device unrolling its rows in a
  program of its own (meta-steps and imitation steps): the same theta."""
  thetas = []
  for shard in (False, True):
    c = _small_quadratic(episodes=6)
    c.meta.shard = shard
    c.imitation.enabled = True
    c.imitation.ratio = 0.5
    trainer.train(c, str(tmp_path / str(shard)), progress=False)
    thetas.append(checkpoints.load_theta(str(tmp_path / str(shard) / "theta.msgpack"))[1])
  rows = [json.loads(l) for l in open(tmp_path / "True" / "metrics.jsonl")]
  assert {r["mode"] for r in rows} == {"meta", "imitation"}
  leaves = lambda t: __import__("jax").tree_util.tree_leaves(t)
  for a, b in zip(leaves(thetas[0]), leaves(thetas[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_training_with_a_residual_tape_gives_the_same_theta(tmp_path):
  """meta.residual_tape with the fused kernels' option (off a GPU XLA's ops write and
  read the tape), in meta-steps and imitation steps, sharded too: the theta of the
  stacked residuals."""
  thetas = []
  for tape, shard in ((False, False), (True, False), (True, True)):
    c = _small_quadratic(episodes=6)
    c.imitation.enabled = True
    c.imitation.ratio = 0.5
    c.model.options = {"lstm_kernel": "pallas"}
    c.meta.remat = ""
    c.meta.residual_tape = tape
    c.meta.shard = shard
    workdir = tmp_path / f"{tape}_{shard}"
    trainer.train(c, str(workdir), progress=False)
    thetas.append(checkpoints.load_theta(str(workdir / "theta.msgpack"))[1])
    rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
    assert {r["mode"] for r in rows} == {"meta", "imitation"}
  leaves = lambda t: __import__("jax").tree_util.tree_leaves(t)
  for other in thetas[1:]:
    for a, b in zip(leaves(thetas[0]), leaves(other)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_initial_theta_is_the_theta_a_training_starts_from(tmp_path, monkeypatch):
  config = tiny_quadratic(episodes=1, checkpoint_every=1, validation_period=1)
  started = []
  build = trainer.build_model

  def recording(config):
    lopt = build(config)
    init = lopt.init
    object.__setattr__(lopt, "init", lambda key: started.append(init(key)) or started[-1])
    return lopt

  monkeypatch.setattr(trainer, "build_model", recording)
  trainer.train(config, str(tmp_path), progress=False)
  monkeypatch.undo()
  assert started  # the first draw is theta's start (later ones may trace shapes)
  chex.assert_trees_all_equal(trainer.initial_theta(config), started[0])
  config.seed += 1  # another seed, another draw
  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(trainer.initial_theta(config), started[0])
