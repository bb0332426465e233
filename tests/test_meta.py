import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import meta, models, optimizees
from l2ojax.meta import step as step_lib


def test_unroll_matches_a_python_loop():
  q = optimizees.get("quadratic", dim=4, num_instances=8)
  tx = optax.adam(0.05)
  state = meta.init_state(tx, q, jax.random.PRNGKey(0))
  run = jax.jit(lambda s, k: meta.unroll(tx, q, s, k, 7))
  new_state, losses = run(state, jax.random.PRNGKey(1))
  chex.assert_shape(losses, (8,))
  params, opt_state, expected = state.params, state.opt_state, []
  for k in jax.random.split(jax.random.PRNGKey(1), 8)[:-1]:
    loss, g = jax.value_and_grad(q.loss)(params, state.instance, k)
    u, opt_state = tx.update(g, opt_state, params)
    params = optax.apply_updates(params, u)
    expected.append(loss)
  expected.append(q.loss(params, state.instance, None))
  np.testing.assert_allclose(losses, np.array(expected), rtol=1e-5)
  np.testing.assert_allclose(new_state.params["x"], params["x"], rtol=1e-5)
  assert int(new_state.step) == 7


def test_first_order_meta_gradient_drops_second_derivatives():
  q = optimizees.get("quadratic", dim=3, num_instances=4)
  lopt = models.dm(preprocessing="identity", scale=1.0)
  theta = lopt.init(jax.random.PRNGKey(0))
  state = meta.init_state(lopt.transform(theta), q, jax.random.PRNGKey(1))

  def meta_loss(theta, second_order):
    _, fs = meta.unroll(lopt.transform(theta), q, state, jax.random.PRNGKey(2), 5, second_order)
    return fs.sum()

  g1 = jax.grad(meta_loss)(theta, False)
  g2 = jax.grad(meta_loss)(theta, True)
  chex.assert_tree_all_finite((g1, g2))
  diff = optax.tree_utils.tree_norm(jax.tree_util.tree_map(jnp.subtract, g1, g2))
  assert diff > 1e-6 * optax.tree_utils.tree_norm(g2)


@pytest.mark.parametrize("model", ["dm", "scale"])
def test_first_order_meta_gradient_equals_plain_autodiff_of_the_unroll(model, tiny_image_npz):
  # The unroll differentiates each step's loss through the gradient it already
  # computed; a loop that lets autodiff redo the optimizee's backward pass must
  # give the same meta-gradient (L2O-Scale also reads the loss as an input).
  mlp = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=16)
  lopt = models.get(model)
  theta = lopt.init(jax.random.PRNGKey(0))
  state = meta.init_state(lopt.transform(theta), mlp, jax.random.PRNGKey(1))
  keys = jax.random.split(jax.random.PRNGKey(2), 6)

  def by_unroll(theta):
    _, fs = meta.unroll(lopt.transform(theta), mlp, state, keys[0], 5)
    return jnp.sum(fs)

  def by_loop(theta):
    tx = lopt.transform(theta)
    params, opt_state, total = state.params, state.opt_state, 0.0
    for k in jax.random.split(keys[0], 6)[:-1]:
      loss, g = jax.value_and_grad(mlp.loss)(params, state.instance, k)
      u, opt_state = tx.update(jax.lax.stop_gradient(g), opt_state, params, value=loss)
      params = optax.apply_updates(params, u)
      total = total + loss
    return total + mlp.loss(params, state.instance, jax.random.split(keys[0], 6)[-1])

  g_unroll, g_loop = jax.jit(jax.grad(by_unroll))(theta), jax.jit(jax.grad(by_loop))(theta)
  chex.assert_trees_all_close(g_unroll, g_loop, rtol=2e-4, atol=1e-7)
  assert optax.tree_utils.tree_norm(g_loop) > 0


def test_meta_step_compiles_once_and_lowers_the_meta_loss():
  q = optimizees.get("quadratic", dim=5, num_instances=16)
  lopt = models.dm(preprocessing="identity", scale=1.0)
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.adam(3e-3)
  outer_state = outer.init(theta)
  init_states = step_lib.make_init_states(lopt, 8)
  meta_step = step_lib.make_meta_step(lopt, outer, segment_length=10)
  traced = chex.assert_max_traces(n=1)(meta_step.__wrapped__)
  meta_step = jax.jit(traced, donate_argnums=(2,))
  key = jax.random.PRNGKey(3)
  history = []
  for episode in range(40):
    key, k_init, k_ep = jax.random.split(key, 3)
    states = init_states(theta, k_init, q)
    total = 0.0
    for k in jax.random.split(k_ep, 2):
      theta, outer_state, states, m = meta_step(theta, outer_state, states, k, q)
      total += float(m["meta_loss"])
      assert int(m["skipped"]) == 0
    history.append(total)
    chex.assert_shape(states.step, (8,))
    assert int(states.step[0]) == 20
  assert np.mean(history[-5:]) < 0.8 * np.mean(history[:5])


def test_non_finite_meta_gradient_leaves_theta_and_outer_state_untouched():
  theta = {"w": jnp.ones(3)}
  outer = optax.adam(0.1)
  outer_state = outer.init(theta)
  bad = {"w": jnp.array([1.0, jnp.nan, 0.0])}
  t2, s2 = step_lib.guarded_update(outer, bad, outer_state, theta, step_lib.tree_all_finite(bad))
  chex.assert_trees_all_equal(t2, theta)
  chex.assert_trees_all_equal(s2, outer_state)
  good = {"w": jnp.ones(3)}
  t3, _ = step_lib.guarded_update(outer, good, outer_state, theta, step_lib.tree_all_finite(good))
  assert not np.allclose(t3["w"], theta["w"])


def test_meta_losses():
  fs = jnp.array([4.0, 2.0, 1.0])
  assert float(meta.losses.get("sum")(fs, 4.0)) == 7.0
  assert float(meta.losses.get("last")(fs, 4.0)) == 1.0
  np.testing.assert_allclose(meta.losses.get("log_ratio")(fs, jnp.array(4.0)),
                             np.mean(np.log(np.array([4, 2, 1]) / (4 + 1e-6) + 1e-6)), rtol=1e-6)


class _KeyOnly:
  """The same optimizee seen only through init and loss(params, instance, key)."""

  def __init__(self, optimizee):
    self._o = optimizee
    self.name = optimizee.name

  def init(self, key):
    return self._o.init(key)

  def loss(self, params, instance, key):
    return self._o.loss(params, instance, key)


def test_minibatches_drawn_before_the_loop_are_the_ones_each_step_would_draw(tiny_image_npz):
  mlp = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=16)
  params, instance = mlp.init(jax.random.PRNGKey(0))
  key = jax.random.PRNGKey(3)
  assert mlp.loss(params, instance, key) == mlp.batch_loss(params, instance, mlp.minibatch(key))
  conv = optimizees.get("mnist_conv", path=tiny_image_npz, batch_size=8)
  c_params, c_instance = conv.init(jax.random.PRNGKey(0))
  assert (conv.loss(c_params, c_instance, key)
          == conv.batch_loss(c_params, c_instance, conv.minibatch(key)))
  tx = models.dm().transform(models.dm().init(jax.random.PRNGKey(1)))
  runs = {}
  for name, o in (("drawn before", mlp), ("drawn per step", _KeyOnly(mlp))):
    state = meta.init_state(tx, o, jax.random.PRNGKey(2))
    for remat_chunk in (0, 3):  # chunks of 3 over 8 steps: 2 chunks and a rest of 2
      runs[name, remat_chunk] = jax.jit(
          lambda s, k, o=o, c=remat_chunk: meta.unroll(tx, o, s, k, 8, remat_chunk=c)
      )(state, jax.random.PRNGKey(4))
  for chunk in (0, 3):
    (s_a, l_a), (s_b, l_b) = runs["drawn before", chunk], runs["drawn per step", chunk]
    np.testing.assert_array_equal(l_a, l_b)
    chex.assert_trees_all_equal(s_a.params, s_b.params)
  assert not np.allclose(runs["drawn before", 0][1][1:], runs["drawn before", 0][1][:-1])


def test_flat_carry_gives_the_same_curves(tiny_image_npz):
  """Carrying the params as one flat vector or leaf by leaf: the same losses (up to
  the rounding of differently fused adds)."""
  mlp = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=16)
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  curves = [meta.batch_rollout(optax.adam(1e-2), mlp, keys, 6, flat_carry=f)
            for f in (True, False)]
  np.testing.assert_allclose(curves[0], curves[1], rtol=1e-6)


def test_flat_carry_gives_the_same_meta_loss_and_gradient(tiny_image_npz):
  mlp = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=16)
  lopt = models.dm()
  theta = lopt.init(jax.random.PRNGKey(0))
  state = meta.init_state(lopt.transform(theta), mlp, jax.random.PRNGKey(2))

  def loss(theta, flat):
    _, fs = meta.unroll(lopt.transform(theta), mlp, state, jax.random.PRNGKey(3), 5,
                        flat_carry=flat)
    return jnp.mean(jnp.log(fs))

  grad = jax.value_and_grad(loss)
  chex.assert_trees_all_close(grad(theta, True), grad(theta, False), rtol=1e-5, atol=1e-7)


def test_meta_step_reports_the_norm_of_the_meta_gradient_it_applied():
  q = optimizees.get("quadratic", dim=5, num_instances=16)
  lopt = models.dm(preprocessing="identity", scale=1.0)
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.sgd(1.0)  # theta moves by exactly the meta-gradient
  states = step_lib.make_init_states(lopt, 4)(theta, jax.random.PRNGKey(1), q)
  meta_step = step_lib.make_meta_step(lopt, outer, segment_length=5)
  new_theta, _, _, m = meta_step(theta, outer.init(theta), states, jax.random.PRNGKey(2), q)
  moved = optax.global_norm(jax.tree_util.tree_map(jnp.subtract, theta, new_theta))
  assert float(m["grad_norm"]) > 0
  np.testing.assert_allclose(float(m["grad_norm"]), float(moved), rtol=1e-5)
