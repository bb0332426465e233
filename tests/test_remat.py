import functools

import chex
import jax
import numpy as np
import optax
import pytest

from l2ojax import models, optimizees
from l2ojax.meta import remat as remat_lib
from l2ojax.meta import step as step_lib


@functools.lru_cache(maxsize=None)
def _one_meta_step(remat):
  q = optimizees.get("quadratic", dim=3, num_instances=2)
  lopt = models.dm(preprocessing="identity", scale=1.0, hidden_sizes=(4,))
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.adam(1e-2)
  states = step_lib.make_init_states(lopt, 2)(theta, jax.random.PRNGKey(1), q)
  step = step_lib.make_meta_step(lopt, outer, segment_length=4, remat=remat)
  new_theta, _, new_states, metrics = step(theta, outer.init(theta), states,
                                           jax.random.PRNGKey(2), q)
  return theta, new_theta, new_states, metrics


@pytest.mark.parametrize("remat", ["update", "update_dots"])
def test_remat_changes_memory_not_the_result(remat):
  theta, plain, plain_states, plain_m = _one_meta_step(None)
  _, rematted, states, m = _one_meta_step(remat)
  assert float(optax.tree_utils.tree_norm(jax.tree_util.tree_map(np.subtract, plain, theta))) > 0
  chex.assert_trees_all_close(rematted, plain, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(states.params, plain_states.params, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["meta_loss"], plain_m["meta_loss"], rtol=1e-6)


def test_checkpointed_update_keeps_extra_args_and_values():
  lopt = models.dm(hidden_sizes=(4,))
  theta = lopt.init(jax.random.PRNGKey(0))
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (7,))}
  grads = {"w": jax.random.normal(jax.random.PRNGKey(2), (7,))}
  tx, ctx = lopt.transform(theta), remat_lib.checkpointed(lopt.transform(theta), "update")
  u1, s1 = tx.update(grads, tx.init(params), params, value=1.0)
  u2, s2 = ctx.update(grads, ctx.init(params), params, value=1.0)
  chex.assert_trees_all_close((u1, s1), (u2, s2), rtol=1e-6)
  assert remat_lib.checkpointed(tx, None) is tx


def test_unknown_policy_names_the_choices():
  lopt = models.dm(hidden_sizes=(4,))
  with pytest.raises(ValueError, match="remat='everything'.*update"):
    step_lib.make_meta_step(lopt, optax.adam(1e-3), 5, remat="everything")
