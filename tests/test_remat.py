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
def _one_meta_step(remat, remat_chunk=0, scan_unroll=1, segment_length=4):
  q = optimizees.get("quadratic", dim=3, num_instances=2)
  lopt = models.dm(preprocessing="identity", scale=1.0, hidden_sizes=(4,))
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.adam(1e-2)
  states = step_lib.make_init_states(lopt, 2)(theta, jax.random.PRNGKey(1), q)
  step = step_lib.make_meta_step(lopt, outer, segment_length=segment_length, remat=remat,
                                 remat_chunk=remat_chunk, scan_unroll=scan_unroll)
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


# (remat, remat_chunk, scan_unroll) over a 5-step segment: chunks that divide it and one
# that leaves a remainder, with and without the update's own remat, and unrolled loops.
@pytest.mark.parametrize("remat,chunk,unroll", [(None, 1, 1), ("update", 2, 1), (None, 3, 1),
                                                (None, 0, 5), ("update", 2, 2)])
def test_chunked_remat_and_unroll_change_nothing_in_the_result(remat, chunk, unroll):
  theta, plain, plain_states, plain_m = _one_meta_step(None, segment_length=5)
  _, new, states, m = _one_meta_step(remat, chunk, unroll, segment_length=5)
  assert float(optax.tree_utils.tree_norm(jax.tree_util.tree_map(np.subtract, plain, theta))) > 0
  chex.assert_trees_all_close(new, plain, rtol=1e-5, atol=1e-7)
  chex.assert_trees_all_close(states, plain_states, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["meta_loss"], plain_m["meta_loss"], rtol=1e-6)


def _compiled_meta_step_bytes(path, remat_chunk):
  """Temporary bytes of a meta-step on an MLP: 80 LSTM-state floats per coordinate per step."""
  q = optimizees.get("mnist_mlp", path=path, hidden_sizes=(64,))
  lopt = models.dm()
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.adam(1e-3)
  states = step_lib.make_init_states(lopt, 2)(theta, jax.random.PRNGKey(1), q)
  step = step_lib.make_meta_step(lopt, outer, segment_length=20, remat="update",
                                 remat_chunk=remat_chunk)
  compiled = step.lower(theta, outer.init(theta), states, jax.random.PRNGKey(2), q).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_remat_keeps_fewer_recurrent_states(tiny_image_npz):
  # 20 steps in chunks of 5: 4 boundary states + 5 inside the chunk being differentiated,
  # instead of 20.
  plain = _compiled_meta_step_bytes(tiny_image_npz, 0)
  chunked = _compiled_meta_step_bytes(tiny_image_npz, 5)
  assert chunked < 0.7 * plain, (chunked, plain)


def test_bad_chunk_or_unroll_is_refused():
  lopt = models.dm(hidden_sizes=(4,))
  with pytest.raises(ValueError, match="remat_chunk=-1"):
    step_lib.make_meta_step(lopt, optax.adam(1e-3), 5, remat_chunk=-1)
  with pytest.raises(ValueError, match="scan_unroll=0"):
    step_lib.make_meta_step(lopt, optax.adam(1e-3), 5, scan_unroll=0)


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


def test_auto_recomputes_on_the_cpu_only(monkeypatch):
  assert remat_lib.resolve("") is None and remat_lib.resolve("update_dots") == "update_dots"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert remat_lib.resolve("auto") == "update"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert remat_lib.resolve("auto") is None
  tx = optax.adam(1e-3)
  assert remat_lib.checkpointed(tx, "auto") is tx  # nothing recomputed on an accelerator
