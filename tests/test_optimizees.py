import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import optimizees


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
