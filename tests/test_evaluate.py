"""Evaluating learned optimizers beside tuned baselines: the library and the command line."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct

from l2ojax import checkpoints, evaluation, meta, models, optimizees, pretrained

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


def _run_evaluate(*args):
  return subprocess.run([sys.executable, "-m", "experiments.evaluate", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_evaluate_cli_runs_learned_and_tuned_baselines_on_other_problems(tmp_path,
                                                                         tiny_image_npz):
  lopt = models.get("dm")
  theta = lopt.init(jax.random.PRNGKey(0))
  checkpoints.save_theta(str(tmp_path / "theta.msgpack"), lopt, theta, {"optimizee": "mnist_mlp"})
  steps, seeds = 12, 2
  out = _run_evaluate(
      f"--workdir={tmp_path}", "--problems=mnist_relu,rosenbrock", f"--steps={steps}",
      f"--seeds={seeds}", "--tune_seeds=2", "--adam_learning_rates=0.001,0.1",
      "--rmsprop_learning_rates=0.001", "--sgd_momentum_learning_rates=0.01,0.001",
      f"--data_path={tiny_image_npz}", "--report_steps=0,12", "--chunk=5")
  assert out.returncode == 0, out.stderr[-3000:]
  summary = open(tmp_path / "eval_summary.md").read()
  record = json.load(open(tmp_path / "eval_summary.json"))
  learned = "dm (trained on mnist_mlp)"
  for name in ("mnist_relu", "rosenbrock"):
    assert (tmp_path / f"eval_{name}.png").read_bytes()[:4] == b"\x89PNG"
    curves = evaluation.read_curves_csv(str(tmp_path / f"eval_{name}.csv"))
    assert len(curves) == 4 and learned in curves
    assert all(c.shape == (seeds, steps + 1) for c in curves.values())
    tuned = record["problems"][name]["tuned"]
    assert set(tuned) == {"adam", "rmsprop", "sgd_momentum"}
    assert tuned["rmsprop"]["learning_rate"] == 0.001
    assert tuned["sgd_momentum"]["learning_rate"] in (0.01, 0.001)
    adam = evaluation.adam_label(tuned["adam"]["learning_rate"])
    for label in curves:
      assert f"| {name} | {label} |" in summary
    # Same inits and minibatches for all: the curves are the library's on the eval keys.
    opt = (optimizees.get(name, path=tiny_image_npz) if optimizees.uses_data(name)
           else optimizees.get(name))
    keys = jax.random.split(jax.random.PRNGKey(12345), seeds)
    np.testing.assert_allclose(curves[adam], evaluation.curves(
        optax.adam(tuned["adam"]["learning_rate"]), opt, keys, steps), rtol=1e-4)
    np.testing.assert_allclose(curves[learned][:, 0], curves[adam][:, 0], rtol=1e-6)
    # The steps-to-target column uses tuned Adam's mean final loss by default.
    np.testing.assert_allclose(record["problems"][name]["target_loss"],
                               curves[adam][:, -1].mean(), rtol=1e-5)


def test_evaluate_cli_takes_a_pretrained_optimizer_by_name(tmp_path, tiny_image_npz):
  name = pretrained.names()[0]
  out = _run_evaluate(f"--workdir={tmp_path}", f"--optimizer={name}", "--problems=mnist_mlp",
                      "--steps=6", "--seeds=2", "--tune_seeds=1", "--baselines=adam",
                      "--adam_learning_rates=0.01", f"--data_path={tiny_image_npz}",
                      "--machine=the test machine")
  assert out.returncode == 0, out.stderr[-3000:]
  summary = open(tmp_path / "eval_summary.md").read()
  assert "Machine: the test machine." in summary and "targets: mnist_mlp " in summary
  assert "Median over runs" in summary and summary.count("| problem | optimizer |") == 2
  assert set(evaluation.read_curves_csv(str(tmp_path / "eval_mnist_mlp.csv"))) == {
      name, "Adam lr=0.01"}
  bad = _run_evaluate(f"--workdir={tmp_path}", "--optimizer=no_such_optimizer")
  assert bad.returncode != 0 and "no_such_optimizer" in bad.stderr and name in bad.stderr


def test_evaluate_cli_overrides_the_learned_optimizers_options(tmp_path, tiny_image_npz):
  common = ("--optimizer=dm_cl_il_mnist", "--problems=mnist_mlp", "--steps=30", "--seeds=2",
            "--tune_seeds=1", "--baselines=adam", "--adam_learning_rates=0.01",
            f"--data_path={tiny_image_npz}")
  out = _run_evaluate(f"--workdir={tmp_path / 'a'}", *common)
  narrow = _run_evaluate(f"--workdir={tmp_path / 'b'}", "--model_options=state_dtype=bfloat16",
                         *common)
  assert out.returncode == 0 and narrow.returncode == 0, narrow.stderr[-3000:]
  wide = evaluation.read_curves_csv(str(tmp_path / "a" / "eval_mnist_mlp.csv"))
  bf16 = evaluation.read_curves_csv(str(tmp_path / "b" / "eval_mnist_mlp.csv"))
  a, b = wide["dm_cl_il_mnist"], bf16["dm_cl_il_mnist (state_dtype=bfloat16)"]
  np.testing.assert_array_equal(a[:, :2], b[:, :2])  # step 0 and the first update: float32 alike
  assert not np.array_equal(a, b) and np.allclose(a, b, rtol=0.05)
  bad = _run_evaluate(f"--workdir={tmp_path / 'c'}", "--model_options=hiden=3", *common)
  assert bad.returncode != 0 and "hiden" in bad.stderr and "state_dtype" in bad.stderr


def test_evaluate_cli_with_the_fused_mlp_kernel(tmp_path, tiny_image_npz):
  """--optimizee_kernel=pallas: off a GPU the MLP's own ops run, so the same curves; an MLP
  the kernel cannot take is named."""
  common = ("--optimizer=dm_cl_il_mnist", "--steps=20", "--seeds=2", "--tune_seeds=1",
            "--baselines=adam", "--adam_learning_rates=0.01", f"--data_path={tiny_image_npz}")
  out = {k: _run_evaluate(f"--workdir={tmp_path / k}", "--problems=mnist_mlp",
                          f"--optimizee_kernel={k}", *common) for k in ("xla", "pallas")}
  assert all(o.returncode == 0 for o in out.values()), out["pallas"].stderr[-3000:]
  curves = {k: evaluation.read_curves_csv(str(tmp_path / k / "eval_mnist_mlp.csv"))
            for k in out}
  for name in curves["xla"]:
    np.testing.assert_allclose(curves["pallas"][name], curves["xla"][name], rtol=1e-5)
  deeper = _run_evaluate(f"--workdir={tmp_path / 'd'}", "--problems=mnist_deeper",
                         "--optimizee_kernel=pallas", *common)
  assert deeper.returncode != 0 and "one hidden layer; hidden_sizes=(20, 20)" in deeper.stderr


def test_evaluate_cli_rejects_unknown_problem(tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--workdir={tmp_path}",
                        "--problems=imagenet_resnet"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0 and "imagenet_resnet" in out.stderr and "mnist_conv" in out.stderr


# --- Evaluation against tuned baselines (the library API). ---

def test_chunked_evaluation_gives_the_curves_of_one_rollout_per_key(tiny_image_npz):
  opt = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=16)
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  whole = np.asarray(meta.batch_rollout(optax.adam(0.01), opt, keys, 12))
  chunked = evaluation.curves(optax.adam(0.01), opt, keys, 12, chunk=5)  # 5 + 5 + 2 steps
  np.testing.assert_allclose(chunked, whole, rtol=1e-6)
  grid = evaluation.grid_curves(optax.adam, opt, keys, 12, [0.1, 0.01], chunk=7)
  assert grid.shape == (2, 3, 13)
  np.testing.assert_allclose(grid[1], whole, rtol=1e-6)
  assert not np.allclose(grid[0], grid[1])
  # a learned optimizer's curves carried flat (as evaluate runs it), chunked: one rollout's
  tx = models.dm().transform(models.dm().init(jax.random.PRNGKey(0)))
  np.testing.assert_allclose(evaluation.curves(tx, opt, keys, 12, chunk=5, flat_carry=True),
                             meta.batch_rollout(tx, opt, keys, 12), rtol=1e-5)


@struct.dataclass
class _DiagonalQuadratic:
  """f(x) = 0.5 sum_i lam_i x_i^2: plain SGD's loss after T steps has a closed form."""
  lam: jax.Array
  name: str = struct.field(pytree_node=False, default="diagonal_quadratic")

  def init(self, key):
    return {"x": jax.random.normal(key, self.lam.shape)}, ()

  def loss(self, params, instance, key):
    del instance, key
    return 0.5 * jnp.sum(self.lam * params["x"] ** 2)


def test_grid_search_picks_the_best_rate_computed_in_closed_form():
  lam = np.array([0.5, 1.0, 3.0, 8.0], np.float32)
  opt = _DiagonalQuadratic(jnp.asarray(lam))
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  steps = 10
  grid = (0.01, 0.05, 0.1, 0.15, 0.2, 0.24, 0.3, 30.0)  # 30: overflows to inf
  tuned = evaluation.tune_learning_rate(optax.sgd, opt, keys, steps, grid)
  # x_T = (1 - lr * lam)^T x_0 for each coordinate, on the x_0 each key draws.
  x0 = np.stack([np.asarray(meta.init_state(optax.sgd(0.1), opt, jax.random.split(k)[0])
                            .params["x"]) for k in keys])

  def closed_form(lr):
    with np.errstate(over="ignore"):
      final = 0.5 * (lam * (1 - lr * lam) ** (2 * steps) * x0**2).sum(axis=1)
    return final.mean() if np.isfinite(final).all() else np.inf

  expected = {lr: closed_form(lr) for lr in grid}
  best = min(expected, key=expected.get)
  assert best not in (grid[0], grid[-1])  # an interior optimum, not an edge of the grid
  assert tuned.learning_rate == best
  assert tuned.scores[30.0] == np.inf
  for lr in grid[:-1]:
    np.testing.assert_allclose(tuned.scores[lr], expected[lr], rtol=2e-3)


def test_every_compared_optimizer_sees_the_same_optimizees_and_minibatches(tiny_image_npz):
  opt = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=8)
  eval_keys = jax.random.split(jax.random.PRNGKey(0), 3)
  tune_keys = jax.random.split(jax.random.PRNGKey(1), 2)
  # Twins of the baselines at the one rate of their grid, entered as "learned" optimizers:
  # identical updates, so the same curves when inits and minibatches are shared (to the
  # rounding of differently fused adds: a learned optimizer's loop carries the parameters
  # flat, a baseline's leaf by leaf).
  learned = {"frozen": optax.set_to_zero(), "adam twin": optax.adam(0.03),
             "sgd twin": optax.chain(optax.trace(decay=0.9), optax.scale(-0.1))}
  ev = evaluation.evaluate(learned, opt, eval_keys, tune_keys, 8, ("adam", "sgd_momentum"),
                           {"adam": (0.03,), "sgd_momentum": (0.1,)}, chunk=3)
  assert set(ev.curves) == set(learned) | {"Adam lr=0.03", "SGD-momentum lr=0.1"}
  assert ev.tuned["adam"].learning_rate == 0.03
  np.testing.assert_allclose(ev.curves["adam twin"], ev.curves["Adam lr=0.03"], rtol=1e-6)
  np.testing.assert_allclose(ev.curves["sgd twin"], ev.curves["SGD-momentum lr=0.1"], rtol=1e-6)
  step0 = {label: c[:, 0] for label, c in ev.curves.items()}
  for c in step0.values():  # the same init and minibatch (compiled apart: to float rounding)
    np.testing.assert_allclose(c, step0["frozen"], rtol=1e-6)
  frozen = ev.curves["frozen"]
  # A frozen optimizee's loss still moves from step to step: each step draws its own
  # minibatch; and the runs differ: each key is its own optimizee.
  assert np.ptp(frozen, axis=1).min() > 0
  assert len(np.unique(frozen[:, 0])) == 3


def test_steps_to_target_and_the_summary_table():
  e = np.e
  losses = np.array([[1.0, e**-1, e**-2, e**-4], [1.0, e**-1, e**-4, e**-4]])
  assert evaluation.steps_to_target(losses, e**-3) == 2  # mean ln: 0, -1, -3, -4
  assert evaluation.steps_to_target(losses, e**-5) is None
  with_nan = losses.copy()
  with_nan[0, 2] = np.nan
  assert evaluation.steps_to_target(with_nan, e**-3) == 3
  table = evaluation.markdown_table({"p": {"a": losses}}, [0, 3], targets={"p": e**-3},
                                    with_std=True)
  assert "| p | a | 0.000 ± 0.000 | -4.000 ± 0.000 | 2 |" in table
  assert "steps to target" in table.splitlines()[0]


def test_median_table_is_not_moved_by_a_run_that_reaches_exactly_zero():
  losses = np.full((5, 3), np.e ** -2)
  losses[0, 2] = 0.0  # one run's minibatch loss underflows to 0 at the last step
  mean = evaluation.mean_log_loss(losses, [0, 2])
  np.testing.assert_allclose(mean, [-2.0, (4 * -2.0 + np.log(1e-30)) / 5])
  np.testing.assert_allclose(evaluation.median_log_loss(losses, [0, 2]), [-2.0, -2.0])
  table = evaluation.markdown_table({"p": {"opt": losses}}, [0, 2], median=True)
  assert "| p | opt | -2.000 | -2.000 |" in table and "±" not in table


def test_the_experiments_modules_share_one_process():
  """Importing the experiments programs together (a notebook, or the tests in whatever
  order pytest-xdist hands them out) defines no flag of the same name twice."""
  modules = ("ablation, benchmark, evaluate, export_pretrained, gpu_kernels, gpu_session, "
             "ncu_kernels, tanh_error, train")
  proc = subprocess.run([sys.executable, "-c", f"from experiments import {modules}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_tanh_error_emulation_rounds_only_the_cells_tanh(tiny_image_npz):
  """experiments.tanh_error: round_bits keeps 11 significant bits (relative error below
  2^-11, exact where 11 bits suffice); the "rounded" mode changes the shipped L2O-DM's
  curve by about that much, and only inside its patch (cells' jax.numpy restored)."""
  import jax.numpy as jnp
  import numpy as np
  from experiments import tanh_error
  from l2ojax import optimizees
  from l2ojax.models import cells
  x = jnp.tanh(jnp.linspace(-4.0, 4.0, 20001))
  rel = jnp.abs(tanh_error.round_bits(x) - x) / jnp.abs(x)
  assert 2 ** -13 < float(jnp.max(rel)) < 2 ** -11
  assert float(tanh_error.round_bits(jnp.float32(0.75))) == 0.75
  assert float(tanh_error.round_bits(jnp.float32(1 + 2 ** -11))) == 1.0  # a tie, to even
  mlp = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=16)
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  exact = tanh_error.curves("exact", "dm_cl_il_mnist", mlp, keys, 4)
  rounded = tanh_error.curves("rounded", "dm_cl_il_mnist", mlp, keys, 4)
  assert cells.jnp is jnp
  assert not np.array_equal(rounded, exact)
  np.testing.assert_allclose(rounded, exact, rtol=1e-3)
