import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import optimizees, products


def _adam_losses(opt, key, steps=30, lr=1e-2):
  params, inst = opt.init(key)
  tx = optax.adam(lr)
  state = tx.init(params)
  losses = []
  for k in jax.random.split(jax.random.PRNGKey(1), steps):
    loss, g = jax.value_and_grad(opt.loss)(params, inst, k)
    u, state = tx.update(g, state, params)
    params = optax.apply_updates(params, u)
    losses.append(float(loss))
  return losses


def test_quadratic_matches_definition():
  q = optimizees.get("quadratic")
  params, inst = q.init(jax.random.PRNGKey(0))
  chex.assert_shape(params["x"], (10,))
  chex.assert_shape(inst["w"], (128, 10, 10))
  w, y, x = map(np.asarray, (inst["w"], inst["y"], params["x"]))
  assert 0 <= w.min() and w.max() < 1 and 0 <= y.min() and y.max() < 1
  expected = np.mean(np.sum((w @ x - y) ** 2, axis=1))
  np.testing.assert_allclose(q.loss(params, inst, None), expected, rtol=1e-5)
  assert np.std(x) < 0.05  # init N(0, 0.01^2)


def test_quadratic_vmaps_over_optimizees_with_distinct_instances():
  q = optimizees.get("quadratic", dim=3, num_instances=5)
  params, inst = jax.vmap(q.init)(jax.random.split(jax.random.PRNGKey(0), 4))
  chex.assert_shape(inst["w"], (4, 5, 3, 3))
  losses = jax.vmap(q.loss)(params, inst, jax.random.split(jax.random.PRNGKey(1), 4))
  chex.assert_shape(losses, (4,))
  assert len(set(np.asarray(losses).round(6))) == 4


def test_mlp_from_npz_learns_and_draws_minibatches_in_jit(tiny_image_npz):
  m = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=32)
  assert m.images.dtype == jnp.uint8 and m.images.shape == (512, 80)
  params, inst = m.init(jax.random.PRNGKey(0))
  chex.assert_shape(params["layer_0"]["w"], (80, 20))
  chex.assert_shape(params["layer_1"]["w"], (20, 10))
  loss = jax.jit(m.loss)
  l1 = loss(params, inst, jax.random.PRNGKey(1))
  l2 = loss(params, inst, jax.random.PRNGKey(2))
  assert np.isfinite(l1) and abs(float(l1) - np.log(10)) < 0.05
  assert float(l1) != float(l2)  # different keys, different minibatches
  losses = _adam_losses(m, jax.random.PRNGKey(0), steps=60, lr=3e-2)
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])


def test_mlp_options_change_architecture(tiny_image_npz):
  m = optimizees.get("mnist_mlp", path=tiny_image_npz, hidden_sizes=(16, 12), activation="relu")
  params, _ = m.init(jax.random.PRNGKey(0))
  assert [params[f"layer_{i}"]["w"].shape for i in range(3)] == [(80, 16), (16, 12), (12, 10)]
  with pytest.raises(ValueError, match="activation"):
    optimizees.get("mnist_mlp", path=tiny_image_npz, activation="swish-ish")


def test_missing_data_fails_with_instructions(tmp_path):
  with pytest.raises(optimizees.DataUnavailableError, match="does not exist"):
    optimizees.get("mnist_mlp", path=str(tmp_path / "nope.npz"))
  # tfds with no network and no prepared data: a message that says how to get it.
  with pytest.raises(optimizees.DataUnavailableError, match="data.path"):
    optimizees.get("mnist_mlp", source="tfds", data_dir=str(tmp_path / "empty"))


def test_unknown_optimizee_lists_allowed():
  with pytest.raises(ValueError, match="quadratic"):
    optimizees.get("mnist_transformer")


def test_biases_gradients_from_the_weights_product_are_autodiffs(tiny_image_npz, monkeypatch):
  """mlp.BIAS_IN_PRODUCT: the same loss and gradient (bias's from [x, 1]^T d), under vmap
  and for a batch of several leading dimensions too; the gradient then has no reduction of
  its own per bias."""
  mlp_lib = importlib.import_module("l2ojax.optimizees.mlp")  # not the function mlp
  problem = optimizees.get("mnist_mlp", path=str(tiny_image_npz), hidden_sizes=(6, 5))
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  params = jax.vmap(lambda k: problem.init(k)[0])(keys)
  idx = jax.vmap(problem.minibatch)(keys)
  value_and_grad = jax.jit(jax.vmap(lambda p, i: jax.value_and_grad(problem.batch_loss)(p, (), i)))
  want = value_and_grad(params, idx)
  hlo = lambda: jax.jit(jax.grad(lambda p: problem.batch_loss(p, (), idx[0]))).lower(
      jax.tree_util.tree_map(lambda a: a[0], params)).as_text()
  # sums over the minibatch (its dimension 0): autodiff's per bias
  biases_summed = lambda text: sum("stablehlo.reduce" in line and "dimensions = [0]" in line
                                   for line in text.splitlines())
  assert biases_summed(hlo()) >= 3
  monkeypatch.setattr(mlp_lib, "BIAS_IN_PRODUCT", True)
  got = jax.jit(jax.vmap(lambda p, i: jax.value_and_grad(problem.batch_loss)(p, (), i)))(
      params, idx)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)
  assert biases_summed(hlo()) == 0
  x, w, b = jnp.ones((2, 4, 3)), jnp.arange(6.0).reshape(3, 2), jnp.array([1.0, -1.0])
  f = lambda dense: lambda x, w, b: jnp.sum(jnp.sin(dense(x, w, b)))
  chex.assert_trees_all_close(jax.grad(f(products.rows_linear), (0, 1, 2))(x, w, b),
                              jax.grad(f(lambda x, w, b: x @ w + b), (0, 1, 2))(x, w, b),
                              rtol=1e-5, atol=1e-5)
