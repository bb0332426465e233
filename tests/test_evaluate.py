"""Evaluating a trained optimizer on other problems, through the real command line."""
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from l2ojax import checkpoints, evaluation, models, optimizees

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mean_log_loss_and_table_flag_divergence():
  losses = np.array([[1.0, np.e, np.e**2], [1.0, np.e**3, np.nan]])
  np.testing.assert_allclose(evaluation.mean_log_loss(losses, [0, 1]), [0.0, 2.0])
  assert np.isnan(evaluation.mean_log_loss(losses, [2])[0])
  table = evaluation.markdown_table({"p": {"a": losses}}, [1, 2])
  assert "| p | a | 2.000 | diverged |" in table


def test_curves_csv_round_trip(tmp_path):
  curves = {"x": np.random.rand(3, 5), "Adam lr=0.01": np.random.rand(3, 5)}
  evaluation.write_curves_csv(str(tmp_path / "c.csv"), curves)
  back = evaluation.read_curves_csv(str(tmp_path / "c.csv"))
  assert set(back) == set(curves)
  for k in curves:
    np.testing.assert_allclose(back[k], curves[k], rtol=1e-7)


def test_evaluate_cli_runs_learned_and_tuned_adam_on_other_problems(tmp_path, tiny_image_npz):
  lopt = models.get("dm")
  theta = lopt.init(jax.random.PRNGKey(0))
  checkpoints.save_theta(str(tmp_path / "theta.msgpack"), lopt, theta, {"optimizee": "mnist_mlp"})
  steps, seeds = 12, 2
  out = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path}",
       "--problems=mnist_relu,rosenbrock", f"--steps={steps}", f"--seeds={seeds}",
       "--tune_seeds=2", "--adam_learning_rates=0.001,0.1", f"--data_path={tiny_image_npz}",
       "--report_steps=0,12"],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-3000:]
  summary = open(tmp_path / "eval_summary.md").read()
  for name in ("mnist_relu", "rosenbrock"):
    assert (tmp_path / f"eval_{name}.png").read_bytes()[:4] == b"\x89PNG"
    curves = evaluation.read_curves_csv(str(tmp_path / f"eval_{name}.csv"))
    assert len(curves) == 2 and "dm (trained on mnist_mlp)" in curves
    (adam,) = [k for k in curves if k.startswith("Adam lr=")]
    assert all(c.shape == (seeds, steps + 1) for c in curves.values())
    assert f"| {name} | {adam} |" in summary
    assert f"| {name} | dm (trained on mnist_mlp) |" in summary
    # Same inits and minibatches for both: the curves are the library's on the eval keys.
    opt = (optimizees.get(name, path=tiny_image_npz) if optimizees.uses_data(name)
           else optimizees.get(name))
    keys = jax.random.split(jax.random.PRNGKey(12345), seeds)
    np.testing.assert_allclose(curves[adam], evaluation.curves(
        optax.adam(float(adam.split("=")[1])), opt, keys, steps), rtol=1e-4)
    np.testing.assert_allclose(curves["dm (trained on mnist_mlp)"][:, 0], curves[adam][:, 0],
                               rtol=1e-6)


def test_evaluate_cli_rejects_unknown_problem(tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path}",
                        "--problems=imagenet_resnet"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0 and "imagenet_resnet" in out.stderr and "mnist_conv" in out.stderr
