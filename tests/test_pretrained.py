"""Pretrained optimizers: shipped files load as optax transformations, round-trip, and work."""
import json
import os
import re
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import checkpoints, meta, models, optimizees, pretrained

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ("dm_cl_il_mnist", "rnnprop_cl_il_mnist")
PARAMS = {"dense": {"kernel": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "bias": jnp.ones(4)},
          "scale": jnp.array(2.0)}


def _updates(tx, steps=3):
  grads = jax.tree_util.tree_map(lambda p: 0.1 * p + 0.05, PARAMS)
  state, out = tx.init(PARAMS), []
  for _ in range(steps):
    u, state = tx.update(grads, state, PARAMS)
    out.append(u)
  return out


def test_a_saved_optimizer_round_trips_through_the_pretrained_api(tmp_path, monkeypatch):
  lopt = models.get("rnnprop")
  theta = lopt.init(jax.random.PRNGKey(7))
  checkpoints.save_theta(str(tmp_path / "mine.msgpack"), lopt, theta, {"optimizee": "x"})
  (tmp_path / "mine.md").write_text("# mine\n")
  monkeypatch.setattr(pretrained, "DIRECTORY", str(tmp_path))
  assert pretrained.names() == ["mine"]
  assert pretrained.card("mine") == "# mine\n"
  _, theta_back, info = pretrained.load_theta("mine")
  chex.assert_trees_all_equal(theta_back, theta)
  assert info == {"optimizee": "x"}
  for got, want in zip(_updates(pretrained.load("mine")), _updates(lopt.transform(theta))):
    chex.assert_trees_all_equal(got, want)
  with pytest.raises(ValueError, match=r"no pretrained optimizer 'nope'.*mine"):
    pretrained.load("nope")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_optimizer_has_weights_a_card_and_its_record(name):
  assert name in pretrained.names()
  lopt, theta, info = pretrained.load_theta(name)
  models.check_theta(lopt, theta)
  assert info["config"]["optimizee"]["name"] == "mnist_mlp"
  assert info["config"]["curriculum"]["enabled"] and info["config"]["imitation"]["enabled"]
  assert re.fullmatch(r"[0-9a-f]{7,}", info["commit"])
  card = pretrained.card(name)
  assert f"`{name}`" in card and info["commit"] in card and "## Measured" in card
  for u in _updates(pretrained.load(name)):
    chex.assert_trees_all_equal_shapes(u, PARAMS)
    chex.assert_tree_all_finite(u)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_optimizer_trains_an_mlp_far_better_than_its_untrained_init(name,
                                                                           tiny_image_npz):
  # The family it was meta-trained on, on other images: trained weights must matter.
  opt = optimizees.get("mnist_mlp", path=tiny_image_npz)
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  lopt, theta, _ = pretrained.load_theta(name)
  trained = meta.batch_rollout(pretrained.load(name), opt, keys, 100)
  untrained = meta.batch_rollout(lopt.transform(lopt.init(jax.random.PRNGKey(0))), opt, keys, 100)
  chex.assert_tree_all_finite(trained)
  assert trained[:, -1].mean() < 0.5 * trained[:, 0].mean()
  assert trained[:, -1].mean() < 0.5 * untrained[:, -1].mean()


def test_export_writes_weights_and_a_card_from_a_run(tmp_path):
  run, out = tmp_path / "run", tmp_path / "out"
  run.mkdir()
  lopt = models.get("dm")
  theta = lopt.init(jax.random.PRNGKey(1))
  checkpoints.save_theta(str(run / "theta.msgpack"), lopt, theta,
                         {"optimizee": "mnist_mlp", "episodes": 3, "stage": 1,
                          "best_val_loss": 0.25})
  (run / "config.json").write_text(json.dumps(
      {"optimizee": {"name": "mnist_mlp", "options": {}}, "data": {"path": "m.npz"}}))
  rows = [{"episode": 0, "stage": 0, "mode": "meta", "episode_steps": 100, "seconds": 2.0},
          {"episode": 1, "stage": 0, "mode": "imitation", "episode_steps": 100, "seconds": 3.0},
          {"episode": 2, "stage": 1, "mode": "meta", "episode_steps": 200, "seconds": 7.0}]
  (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  ev = tmp_path / "ev"
  ev.mkdir()
  (ev / "eval_summary.md").write_text("| problem | optimizer |\n")
  (ev / "eval_mnist_mlp.png").write_bytes(b"\x89PNG")
  res = subprocess.run([sys.executable, "-m", "experiments.export_pretrained", f"--workdir={run}",
                        "--name=tiny_dm", f"--directory={out}", f"--evaluation={ev}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  lopt2, theta2, info = checkpoints.load_theta(str(out / "tiny_dm.msgpack"))
  chex.assert_trees_all_equal(theta2, theta)
  assert info["training"] == {"episodes": 3, "imitation_episodes": 1, "optimizee_steps": 400,
                              "stages_reached": [0, 1], "seconds": 12.0}
  assert info["config"]["data"] == {"path": "m.npz"} and info["best_val_loss"] == 0.25
  card = (out / "tiny_dm.md").read_text()
  assert "3 episodes (1 of them imitation)" in card and "| problem | optimizer |" in card
  assert "(../ev/eval_mnist_mlp.png)" in card  # relative to the card's folder
  bad = subprocess.run([sys.executable, "-m", "experiments.export_pretrained", f"--workdir={run}",
                        "--name=Bad Name", f"--directory={out}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode != 0 and "--name" in bad.stderr
