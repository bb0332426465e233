"""Checks every registered learned optimizer must pass (in the spirit of optax's
contrib/_common_test.py): structure- and dtype-stable state, jit with extra
args, optax.chain, vmap over optimizees, lax.scan, save/load round trip."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import checkpoints, models

NAMES = models.names()


def _params(dtype=jnp.float32):
  return {"layer": {"w": jnp.full((3, 4), 0.5, dtype), "b": jnp.zeros((4,), dtype)},
          "scalar": jnp.ones((), dtype), "v": jnp.arange(5.0, dtype=dtype)}


def _loss(p):
  leaves = jax.tree_util.tree_leaves(p)
  return sum(jnp.sum(jnp.square(x.astype(jnp.float32) - 1.0)) for x in leaves)


def _tx(name, key=0):
  lopt = models.get(name)
  return lopt, lopt.transform(lopt.init(jax.random.PRNGKey(key)))


def test_registry_lists_every_model_and_rejects_unknown():
  assert {"dm", "rnnprop", "scale"} <= set(NAMES)
  with pytest.raises(ValueError, match="rnnprop"):
    models.get("adamw_but_learned")


@pytest.mark.parametrize("name", NAMES)
def test_theta_is_float32_and_not_weakly_typed(name):
  """A weakly typed leaf turns strong after the first outer update: every jitted
  meta-step would then compile twice."""
  theta = models.get(name).init(jax.random.PRNGKey(0))
  for path, x in jax.tree_util.tree_leaves_with_path(theta):
    assert x.dtype == jnp.float32 and not x.weak_type, jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", NAMES)
def test_jit_with_extra_args_keeps_state_structure_through_scan(name):
  _, tx = _tx(name)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params = _params()
  state = tx.init(params)
  chex.clear_trace_counter()  # the counter is keyed by code location, shared across models

  @chex.assert_max_traces(n=1)
  def run(params, state):
    def body(carry, _):
      p, s = carry
      loss, g = jax.value_and_grad(_loss)(p)
      u, s2 = tx.update(g, s, p, value=loss)
      chex.assert_trees_all_equal_shapes_and_dtypes(s, s2)
      chex.assert_trees_all_equal_shapes_and_dtypes(u, p)
      return (optax.apply_updates(p, u), s2), loss
    return jax.lax.scan(body, (params, state), None, length=6)

  run = jax.jit(run)
  (p, s), losses = run(params, state)
  (p, s), losses2 = run(p, s)  # same shapes again: no retrace
  chex.assert_trees_all_equal_structs(s, state)
  chex.assert_tree_all_finite((p, s, losses, losses2))
  moved = optax.tree_utils.tree_norm(jax.tree_util.tree_map(jnp.subtract, p, params))
  assert moved > 0.0


@pytest.mark.parametrize("name", NAMES)
def test_update_depends_on_the_gradient(name):
  _, tx = _tx(name)
  params = _params()
  state = tx.init(params)
  g1 = jax.tree_util.tree_map(jnp.ones_like, params)
  g2 = jax.tree_util.tree_map(lambda x: -jnp.ones_like(x), params)
  update = jax.jit(lambda g: tx.update(g, state, params, value=jnp.array(1.0))[0])
  u1, u2 = update(g1), update(g2)
  assert not np.allclose(np.asarray(u1["v"]), np.asarray(u2["v"]))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_tiny_and_huge_finite_gradients_give_finite_updates_and_state(name, scale):
  """Float32's extremes, as a diverging optimizee gives them: the squares of 1e30
  overflow, those of 1e-30 underflow. (Adam's updates stay finite there, but its
  second moment turns inf for good.)"""
  _, tx = _tx(name)
  params = _params()
  state = tx.init(params)
  for step in range(3):
    grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, scale * (-1.0) ** step), params)
    updates, state = tx.update(grads, state, params, value=jnp.float32(scale))
    for what, tree in (("updates", updates), ("state", state)):
      for path, x in jax.tree_util.tree_leaves_with_path(tree):
        assert bool(jnp.all(jnp.isfinite(x))), f"step {step}: {what}{jax.tree_util.keystr(path)}"
    params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", NAMES)
def test_works_inside_optax_chain_and_an_ordinary_loop(name):
  _, inner = _tx(name)
  tx = optax.chain(optax.clip_by_global_norm(10.0), inner)  # chain forwards value= to inner
  params = _params()
  state = tx.init(params)
  step = jax.jit(lambda p, s: _step(tx, p, s))
  for _ in range(5):
    params, state, loss = step(params, state)
  chex.assert_tree_all_finite((params, loss))
  chex.assert_trees_all_equal_shapes_and_dtypes(params, _params())


def _step(tx, p, s):
  loss, g = jax.value_and_grad(_loss)(p)
  u, s = tx.update(g, s, p, value=loss)
  return optax.apply_updates(p, u), s, loss


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_optimizees_matches_one_at_a_time(name):
  _, tx = _tx(name)
  batch = jax.tree_util.tree_map(
      lambda x: jnp.stack([x, 2.0 * x + 0.3, -x]), _params())
  states = jax.vmap(tx.init)(batch)
  new_p, new_s, losses = jax.jit(jax.vmap(lambda p, s: _step(tx, p, s)))(batch, states)
  chex.assert_shape(losses, (3,))
  one = jax.jit(lambda p: _step(tx, p, tx.init(p)))
  for i in range(3):
    p_i = jax.tree_util.tree_map(lambda x: x[i], batch)
    want_p, _, _ = one(p_i)
    got_p = jax.tree_util.tree_map(lambda x: x[i], new_p)
    chex.assert_trees_all_close(got_p, want_p, rtol=1e-5, atol=1e-7)
  assert not np.allclose(np.asarray(new_p["v"][0]), np.asarray(new_p["v"][2]))


def _dtype_cases():
  for name in NAMES:
    for dtype in (jnp.float32, jnp.bfloat16):
      yield pytest.param(name, dtype, id=f"{name}-{jnp.dtype(dtype).name}")


@pytest.mark.parametrize("name,dtype", list(_dtype_cases()))
def test_updates_keep_the_parameter_dtype(name, dtype):
  _, tx = _tx(name)
  params = _params(dtype)
  state = tx.init(params)
  g = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.1), params)
  u, s2 = jax.jit(lambda g, s, p: tx.update(g, s, p, value=jnp.array(1.0)))(g, state, params)
  chex.assert_trees_all_equal_dtypes(u, params)
  chex.assert_trees_all_equal_shapes_and_dtypes(s2, state)


@pytest.mark.parametrize("name", NAMES)
def test_wrong_parameter_count_is_a_clear_error(name):
  _, tx = _tx(name)
  state = tx.init({"x": jnp.zeros(3)})
  with pytest.raises(ValueError, match="coordinates"):
    tx.update({"x": jnp.zeros(4)}, state, value=jnp.array(1.0))


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, tmp_path):
  lopt, _ = _tx(name)
  theta = lopt.init(jax.random.PRNGKey(3))
  path = str(tmp_path / f"{name}.msgpack")
  checkpoints.save_theta(path, lopt, theta, {"note": "test"})
  lopt2, theta2, info = checkpoints.load_theta(path)
  assert lopt2 == lopt and lopt2.options() == lopt.options() and info == {"note": "test"}
  chex.assert_trees_all_equal(theta2, theta)
  params = _params()
  g = jax.tree_util.tree_map(jnp.ones_like, params)
  tx, tx2 = lopt.transform(theta), lopt2.transform(theta2)
  first = lambda tx: jax.jit(lambda p: tx.update(g, tx.init(p), p, value=jnp.array(2.0))[0])
  u, u2 = first(tx)(params), first(tx2)(params)
  chex.assert_trees_all_close(u, u2)


@pytest.mark.parametrize("name", NAMES)
def test_foreign_theta_is_rejected(name):
  lopt = models.get(name)
  other = [n for n in NAMES if n != name][0]
  with pytest.raises(ValueError, match="structure"):
    lopt.transform(models.get(other).init(jax.random.PRNGKey(0)))
