"""Killed runs resume as if never interrupted; bad values never reach saved state."""
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2ojax import checkpoints, models
from l2ojax.meta import trainer
from tests.helpers.configs import tiny_quadratic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--config=experiments/configs/dm_quadratic.py", "--config.meta.num_episodes=24",
         "--config.meta.batch_size=8", "--config.checkpoint_every=4",
         "--config.validation.period=4", "--config.validation.num_optimizees=8",
         "--config.eval.num_optimizees=4", "--config.eval.steps=20"]


def _train_cmd(workdir, module="experiments.train", extra=()):
  return [sys.executable, "-m", module, *extra, f"--workdir={workdir}", *FLAGS]


def _load(workdir):
  _, theta, info = checkpoints.load_theta(os.path.join(workdir, "theta.msgpack"))
  return theta, info


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  out = subprocess.run(_train_cmd(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def _wait_for_episodes(workdir, n: int, timeout: float = 300):
  """metrics.jsonl of a training subprocess, once it holds ``n`` episodes."""
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + timeout
  while time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
      break
    time.sleep(0.05)
  return metrics


def test_sigkill_during_training_resumes_to_the_same_theta(uninterrupted, tmp_path):
  workdir = tmp_path / "killed"
  proc = subprocess.Popen(_train_cmd(workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  metrics = _wait_for_episodes(workdir, 10)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(metrics.read_text().splitlines())
  assert 10 <= done < 24, f"killed after {done} episodes: not mid-run"
  out = subprocess.run(_train_cmd(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from episode" in out.stdout
  t_full, info_full = _load(uninterrupted)
  t_res, info_res = _load(workdir)
  chex.assert_trees_all_equal(t_full, t_res)  # bitwise, on CPU
  assert info_full == info_res
  rows = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [r["episode"] for r in rows] == list(range(24))


def test_sigterm_pauses_after_the_episode_under_way_and_resumes_to_the_same_theta(
    uninterrupted, tmp_path):
  workdir = tmp_path / "terminated"
  proc = subprocess.Popen(_train_cmd(workdir), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  metrics = _wait_for_episodes(workdir, 6)
  proc.send_signal(signal.SIGTERM)
  stdout, _ = proc.communicate(timeout=300)
  assert proc.returncode == 75, stdout[-2000:]  # paused, not killed
  done = len(metrics.read_text().splitlines())
  assert 6 <= done < 24 and f"paused after episode {done} of 24" in stdout
  # the pause checkpointed the last episode, off the checkpoint period or not
  assert checkpoints.CheckpointManager(str(workdir / "checkpoints")).latest_step() == done
  out = subprocess.run(_train_cmd(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert f"resumed from episode {done}" in out.stdout
  chex.assert_trees_all_equal(_load(uninterrupted)[0], _load(workdir)[0])


def test_a_save_killed_half_way_leaves_the_previous_checkpoint_usable(uninterrupted, tmp_path):
  workdir = tmp_path / "killed_mid_save"
  # checkpoint_every=4 over 24 episodes: the 3rd save is episode 12's.
  out = subprocess.run(_train_cmd(workdir, "tests.helpers.train_killed_mid_save", ["3"]),
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr[-2000:])
  ckpt_dir = workdir / "checkpoints"
  assert any("tmp" in p.name for p in ckpt_dir.iterdir()), list(ckpt_dir.iterdir())
  assert checkpoints.CheckpointManager(str(ckpt_dir)).latest_step() == 8
  out = subprocess.run(_train_cmd(workdir), cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from episode 8" in out.stdout
  chex.assert_trees_all_equal(_load(uninterrupted)[0], _load(workdir)[0])


def test_same_config_and_seed_give_bitwise_the_same_theta(tmp_path):
  a = trainer.train(tiny_quadratic(), str(tmp_path / "a"), progress=False)
  b = trainer.train(tiny_quadratic(), str(tmp_path / "b"), progress=False)
  chex.assert_trees_all_equal(a.theta, b.theta)
  c = tiny_quadratic()
  c.seed = 1
  other = trainer.train(c, str(tmp_path / "c"), progress=False)
  assert not np.array_equal(np.asarray(other.theta["linear"]["w"]),
                            np.asarray(a.theta["linear"]["w"]))


@jax.custom_vjp
def _nan_backward(x):
  return x


_nan_backward.defvjp(lambda x: (x, None), lambda _, g: (jnp.full_like(g, jnp.nan),))


class _NaNMetaGradient:
  """L2O-DM whose meta-gradient is NaN: the forward pass is untouched."""

  def __init__(self):
    self._dm = models.dm(preprocessing="identity", scale=1.0)
    self.name = "nan_meta_gradient"

  def init(self, key):
    return self._dm.init(key)

  def options(self):
    return {}

  def transform(self, theta):
    return self._dm.transform(jax.tree_util.tree_map(_nan_backward, theta))


def test_non_finite_meta_gradients_never_reach_theta_or_checkpoints(tmp_path, monkeypatch):
  models.register("nan_meta_gradient", lambda **_: _NaNMetaGradient())
  c = tiny_quadratic()
  c.model.name = "nan_meta_gradient"
  c.model.options = {}
  theta0 = _NaNMetaGradient().init(jax.random.split(jax.random.PRNGKey(c.seed), 3)[1])
  result = trainer.train(c, str(tmp_path), progress=False)
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  segments = c.meta.episode_steps // c.meta.segment_length
  assert sum(r["skipped_updates"] for r in rows) == c.meta.num_episodes * segments
  chex.assert_trees_all_equal(result.theta, theta0)
  outer_state = trainer.build_outer_optimizer(c.meta).init(theta0)
  saved, meta = checkpoints.CheckpointManager(str(tmp_path / "checkpoints")).restore(
      {"theta": theta0, "outer_state": outer_state, "il_outer_state": outer_state,
       "key": jax.random.PRNGKey(0), "best_theta": theta0})
  chex.assert_tree_all_finite(saved)
  chex.assert_trees_all_equal(saved["theta"], theta0)
  assert meta["skipped_updates"] == c.meta.num_episodes * segments
