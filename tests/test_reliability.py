"""What a run guarantees when values go bad or a user's input is wrong."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import models, optimizees
from l2ojax.meta import step as step_lib


def _setup(batch=4):
  q = optimizees.get("quadratic", dim=3, num_instances=8)
  lopt = models.dm(preprocessing="identity", scale=1.0)
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.sgd(1e-2)  # update proportional to the meta-gradient (Adam's first is its sign)
  states = step_lib.make_init_states(lopt, batch)(theta, jax.random.PRNGKey(1), q)
  return q, lopt, theta, outer, states


@pytest.mark.parametrize("poison", [np.nan, 1e25, 1e3])  # NaN, overflow to inf, past the bound
def test_a_diverging_optimizee_is_reset_and_does_not_touch_the_others(poison):
  q, lopt, theta, outer, states = _setup()
  meta_step = step_lib.make_meta_step(lopt, outer, segment_length=5, divergence_bound=1e3)

  def run(x0):
    s = jax.tree_util.tree_map(jnp.copy, states)  # the meta-step donates its states
    s = s._replace(params={"x": s.params["x"].at[0].set(x0)})
    return meta_step(theta, outer.init(theta), s, jax.random.PRNGKey(2), q)

  t_poison, _, s_poison, m = run(jnp.full(3, poison))
  assert int(m["diverged"]) == 1 and int(m["skipped"]) == 0
  chex.assert_tree_all_finite((t_poison, s_poison))
  assert int(s_poison.step[0]) == 0 and np.all(np.asarray(s_poison.step[1:]) == 5)
  # The diverged optimizee has no say in theta: a different poison gives the same theta ...
  t_other, _, _, m2 = run(jnp.full(3, -7e24))
  assert int(m2["diverged"]) == 1
  chex.assert_trees_all_close(t_poison, t_other, rtol=0, atol=0)
  # ... while a healthy optimizee 0 does change it.
  t_healthy, _, _, m3 = run(states.params["x"][0])
  assert int(m3["diverged"]) == 0
  assert not np.allclose(np.asarray(t_healthy["linear"]["w"]), np.asarray(t_poison["linear"]["w"]))


def test_all_diverged_skips_the_update():
  q, lopt, theta, outer, states = _setup(batch=2)
  meta_step = step_lib.make_meta_step(lopt, outer, segment_length=3)
  s = states._replace(params={"x": jnp.full_like(states.params["x"], jnp.nan)})
  outer_state = outer.init(theta)
  t2, o2, s2, m = meta_step(theta, outer_state, s, jax.random.PRNGKey(0), q)
  assert int(m["skipped"]) == 1 and int(m["diverged"]) == 2
  chex.assert_trees_all_equal(t2, theta)
  chex.assert_trees_all_equal(o2, outer_state)
  chex.assert_tree_all_finite(s2)


def test_transform_rejects_non_float_params_and_mismatched_grads():
  lopt = models.dm()
  tx = lopt.transform(lopt.init(jax.random.PRNGKey(0)))
  with pytest.raises(TypeError, match=r"params\['n'\].*int32"):
    tx.init({"n": jnp.arange(3), "x": jnp.zeros(2)})
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  state = tx.init(params)
  with pytest.raises(ValueError, match="structure"):
    tx.update({"a": jnp.zeros(3), "c": jnp.zeros((2, 2))}, state, params)
  with pytest.raises(ValueError, match=r"gradient\['b'\] has shape \(4,\)"):
    tx.update({"a": jnp.zeros(3), "b": jnp.zeros(4)}, state, params)
  with pytest.raises(TypeError, match="gradients"):
    tx.update({"a": jnp.zeros(3, jnp.int32), "b": jnp.zeros((2, 2))}, state, params)
