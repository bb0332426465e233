import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import models, optimizees
from l2ojax.meta import imitation as il
from l2ojax.meta.unroll import init_state, unroll


@dataclasses.dataclass(frozen=True)
class ScaledGradient:
  """The smallest learned optimizer: update = -theta["lr"] * g. Not L2O-DM, so
  the imitation code is exercised through the bare init/transform interface."""
  name: str = "scaled_gradient"

  def init(self, key):
    del key
    return {"lr": jnp.asarray(0.05, jnp.float32)}

  def transform(self, theta):
    def update_fn(updates, state, params=None, **extra):
      del params, extra
      return jax.tree_util.tree_map(lambda g: -theta["lr"] * g, updates), state
    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update_fn)

  def options(self):
    return {}


def _quadratic():
  return optimizees.get("quadratic")


def test_loss_is_zero_for_equal_updates_and_matches_a_hand_computation():
  t = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
  l = {"a": jnp.array([1.0, 0.0]), "b": jnp.array([4.0])}
  assert float(il.imitation_loss(t, t)) == 0.0
  # 0.5 * ((1-1)^2 + (2-0)^2 + (3-4)^2) / 3 coordinates
  np.testing.assert_allclose(il.imitation_loss(t, l), 0.5 * (0 + 4 + 1) / 3, rtol=1e-6)


def test_a_learner_equal_to_the_teacher_has_zero_loss_along_an_episode():
  opt = _quadratic()
  teacher = il.make_teacher("adam", 0.01)
  state = il.init_imitation_state(teacher, il.make_teacher("adam", 0.01), opt,
                                  jax.random.PRNGKey(0))
  _, losses, _ = il.imitation_unroll(teacher, il.make_teacher("adam", 0.01), opt, state,
                                     jax.random.PRNGKey(1), 10)
  np.testing.assert_allclose(losses, np.zeros(10), atol=1e-15)  # float rounding only
  _, losses, _ = il.imitation_unroll(teacher, il.make_teacher("adam", 0.02), opt, state,
                                     jax.random.PRNGKey(1), 10)
  assert np.all(np.asarray(losses) > 1e-9)  # updates ~1e-2 apart: loss ~1e-5


@pytest.mark.parametrize("k", [1, 2])
def test_the_optimizee_follows_the_teacher_never_the_learner(k):
  """Params after an imitation segment are exactly the teacher's unroll from the
  same init and minibatches, whatever the (here large) learner updates are."""
  opt = _quadratic()
  teacher = il.make_teacher("adam", 0.01)
  lopt = models.get("dm", preprocessing="identity", scale=100.0)
  learner = lopt.transform(lopt.init(jax.random.PRNGKey(3)))
  key, seg_key = jax.random.PRNGKey(4), jax.random.PRNGKey(5)
  state = il.init_imitation_state(teacher, learner, opt, key)
  new, losses, fs = il.imitation_unroll(teacher, learner, opt, state, seg_key, 6, k)
  ref, ref_fs = unroll(teacher, opt, init_state(teacher, opt, key), seg_key, 6 * k)
  chex.assert_trees_all_close(new.params, ref.params, rtol=1e-6)
  np.testing.assert_allclose(fs, ref_fs, rtol=1e-6)
  assert losses.shape == (6,) and int(new.step) == 6 * k
  assert float(jnp.sum(losses)) > 1e-3  # the learner did propose different updates


def test_batched_step_keeps_the_teacher_trajectory_and_learns_the_teacher():
  """The jitted, vmapped step: params follow the teacher per optimizee; repeated
  steps pull the learner's rate to the teacher's; one compile for all segments."""
  opt, lopt = _quadratic(), ScaledGradient()
  teacher = optax.sgd(0.01)
  outer = optax.adam(0.003)  # <= 40 x 0.003 of travel
  theta = lopt.init(None)
  init = il.make_init_imitation_states(lopt, teacher, batch_size=3)
  step = il.make_imitation_step(lopt, teacher, outer, segment_length=5)
  states = init(theta, jax.random.PRNGKey(0), opt)
  k_seg = jax.random.PRNGKey(1)
  ref_states = jax.vmap(lambda kk: init_state(teacher, opt, kk))(
      jax.random.split(jax.random.PRNGKey(0), 3))
  chex.assert_trees_all_close(states.params, ref_states.params)  # the same fresh optimizees
  ref, _ = jax.vmap(lambda s, kk: unroll(teacher, opt, s, kk, 5))(
      ref_states, jax.random.split(k_seg, 3))
  outer_state = outer.init(theta)
  theta, outer_state, states, m = step(theta, outer_state, states, k_seg, opt)
  chex.assert_trees_all_close(states.params, ref.params, rtol=1e-6)
  for i in range(40):  # fresh optimizees each time: gradients of one scale for Adam
    states = init(theta, jax.random.PRNGKey(100 + i), opt)
    theta, outer_state, _, m = step(theta, outer_state, states, jax.random.PRNGKey(i), opt)
  assert abs(float(theta["lr"]) - 0.01) < 0.003  # the teacher's rate, from 0.05
  assert step._cache_size() == 1


def test_imitation_step_reports_the_norm_of_the_meta_gradient_it_applied():
  opt, lopt = _quadratic(), ScaledGradient()
  teacher, outer = optax.sgd(0.01), optax.sgd(1.0)  # theta moves by exactly the gradient
  theta = lopt.init(None)
  states = il.make_init_imitation_states(lopt, teacher, 3)(theta, jax.random.PRNGKey(0), opt)
  step = il.make_imitation_step(lopt, teacher, outer, segment_length=5)
  new_theta, _, _, m = step(theta, outer.init(theta), states, jax.random.PRNGKey(1), opt)
  moved = optax.global_norm(jax.tree_util.tree_map(jnp.subtract, theta, new_theta))
  assert float(m["grad_norm"]) > 0
  np.testing.assert_allclose(float(m["grad_norm"]), float(moved), rtol=1e-5)


def test_non_finite_imitation_loss_leaves_theta_untouched():
  opt, lopt = _quadratic(), ScaledGradient()
  teacher = optax.chain(optax.sgd(0.1), optax.scale(jnp.nan))
  outer = optax.adam(0.1)
  theta = lopt.init(None)
  states = il.make_init_imitation_states(lopt, teacher, 2)(theta, jax.random.PRNGKey(0), opt)
  step = il.make_imitation_step(lopt, teacher, outer, segment_length=4)
  outer_state = outer.init(theta)
  new_theta, new_outer, _, m = step(theta, outer_state, states, jax.random.PRNGKey(1), opt)
  assert int(m["skipped"]) == 1
  chex.assert_trees_all_equal(new_theta, theta)
  chex.assert_trees_all_equal(new_outer, outer_state)


def test_bad_settings_fail_clearly():
  with pytest.raises(ValueError, match="imitation.teacher"):
    il.make_teacher("lbfgs")
  with pytest.raises(ValueError, match="imitation.k"):
    il.make_imitation_step(ScaledGradient(), optax.sgd(0.1), optax.sgd(0.1), 20, k=3)
