import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import rnnprop_mnist
from l2ojax import models, optimizees
from l2ojax.meta import step as step_lib
from l2ojax.meta import trainer


def _tx(**options):
  lopt = models.rnnprop(**options)
  return lopt, lopt.transform(lopt.init(jax.random.PRNGKey(0)))


def _run(tx, grads_seq, params):
  """Updates and states for a sequence of gradient pytrees (jitted, one trace)."""
  state = tx.init(params)
  update = jax.jit(lambda g, s: tx.update(g, s, params))
  out = []
  for g in grads_seq:
    u, state = update(g, state)
    out.append((u, state))
  return out


def test_moments_are_bias_corrected_adam_statistics_of_the_given_gradients():
  lopt, tx = _tx()
  rng = np.random.default_rng(0)
  gs = [rng.normal(size=7).astype(np.float32) * 10.0 ** rng.integers(-4, 1) for _ in range(3)]
  params = {"x": jnp.zeros(7)}
  m = v = np.zeros(7)
  for t, (g, (_, state)) in enumerate(zip(gs, _run(tx, [{"x": g} for g in gs], params)), 1):
    m = 0.95 * m + 0.05 * g
    v = 0.95 * v + 0.05 * g ** 2
    np.testing.assert_allclose(state.mu, m, rtol=1e-5)
    np.testing.assert_allclose(state.nu, v, rtol=1e-5)
    assert int(state.count) == t
  # the network's inputs: m_hat / (sqrt(v_hat) + eps) and g / (sqrt(v_hat) + eps)
  prev = _run(tx, [{"x": g} for g in gs[:2]], params)[-1][1]
  x, _ = lopt.features(jnp.asarray(gs[2]), prev)
  m_hat, v_hat = m / (1 - 0.95 ** 3), v / (1 - 0.95 ** 3)
  np.testing.assert_allclose(x[:, 0], m_hat / (np.sqrt(v_hat) + 1e-8), rtol=1e-4)
  np.testing.assert_allclose(x[:, 1], gs[2] / (np.sqrt(v_hat) + 1e-8), rtol=1e-4)


def test_updates_are_invariant_to_the_gradient_scale_and_bounded():
  _, tx = _tx()
  params = {"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)}
  rng = np.random.default_rng(1)
  seq = [{"a": rng.normal(size=(2, 3)) * 1e-2, "b": rng.normal(size=4) * 1e-2} for _ in range(4)]
  small = _run(tx, seq, params)
  big = _run(tx, [jax.tree_util.tree_map(lambda x: 1e4 * x, g) for g in seq], params)
  for (u1, _), (u2, _) in zip(small, big):
    chex.assert_trees_all_close(u1, u2, rtol=1e-3, atol=1e-7)
    assert max(float(jnp.abs(x).max()) for x in jax.tree_util.tree_leaves(u2)) <= 0.01


def test_hidden_sizes_option_sets_the_lstm_stack():
  lopt, tx = _tx(hidden_sizes=(8,), input_size=6)
  theta = lopt.init(jax.random.PRNGKey(0))
  assert sorted(theta) == ["input", "linear", "lstm_0"]
  chex.assert_shape(theta["input"]["w"], (2, 6))
  state = tx.init({"x": jnp.zeros(5)})
  chex.assert_shape(state.lstm[0].h, (5, 8))


def test_short_meta_training_lowers_the_meta_loss():
  q = optimizees.get("quadratic", dim=5, num_instances=16)
  lopt = models.rnnprop(scale=0.1)
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.adam(3e-3)
  outer_state = outer.init(theta)
  init_states = step_lib.make_init_states(lopt, 8)
  meta_step = step_lib.make_meta_step(lopt, outer, segment_length=10)
  key = jax.random.PRNGKey(1)
  history = []
  for _ in range(40):
    key, k_init, k_ep = jax.random.split(key, 3)
    states = init_states(theta, k_init, q)
    total = 0.0
    for k in jax.random.split(k_ep, 2):
      theta, outer_state, states, m = meta_step(theta, outer_state, states, k, q)
      total += float(m["meta_loss"])
    history.append(total)
  assert np.mean(history[-5:]) < 0.8 * np.mean(history[:5]), history


@pytest.mark.slow
def test_rnnprop_mnist_config_trains(tmp_path, tiny_image_npz):
  c = rnnprop_mnist.get_config()
  assert c.model.name == "rnnprop"
  c.data.path = tiny_image_npz
  c.meta.batch_size = 2
  c.meta.num_episodes = 2
  c.meta.episode_steps = 40
  c.validation.period = 2
  c.validation.num_optimizees = 2
  c.validation.steps = 20
  result = trainer.train(c, str(tmp_path), progress=False)
  assert result.lopt.name == "rnnprop"
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert len(rows) == 2 and np.isfinite(rows[-1]["val_loss"])
