import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import models
from l2ojax.models import cells, preprocess


def _params():
  return {"a": {"w": jnp.ones((3, 4)), "b": jnp.zeros((4,))}, "c": jnp.arange(5.0)}


def test_log_and_sign_matches_formula():
  g = jnp.array([1e-8, -1e-3, 0.5, -20.0])
  out = np.asarray(preprocess.log_and_sign(g, k=5.0))
  eps = np.finfo(np.float32).eps
  expected_log = np.maximum(np.log(np.abs(np.asarray(g)) + eps) / 5.0, -1.0)
  expected_sign = np.clip(np.asarray(g) * np.exp(5.0), -1, 1)
  np.testing.assert_allclose(out[:, 0], expected_log, rtol=1e-6)
  np.testing.assert_allclose(out[:, 1], expected_sign, rtol=1e-6)


def test_lstm_cell_is_sonnet_v1():
  key = jax.random.PRNGKey(0)
  p = cells.lstm_init(key, 2, 3)
  p["b"] = jax.random.normal(key, (12,))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 2))
  s = cells.LSTMState(jax.random.normal(jax.random.PRNGKey(2), (5, 3)),
                      jax.random.normal(jax.random.PRNGKey(3), (5, 3)))
  out = cells.lstm_apply(p, x, s, forget_bias=1.0)
  sig = lambda z: 1 / (1 + np.exp(-z))
  gates = np.concatenate([x, s.h], 1) @ np.asarray(p["w"]) + np.asarray(p["b"])
  i, j, f, o = np.split(gates, 4, axis=1)
  c = sig(f + 1.0) * np.asarray(s.c) + sig(i) * np.tanh(j)
  np.testing.assert_allclose(out.c, c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.h, sig(o) * np.tanh(c), rtol=1e-5, atol=1e-6)


def _textbook_lstm(p, x, s, forget_bias=1.0):
  gates = jnp.concatenate([x, s.h], -1) @ p["w"] + p["b"]
  i, j, f, o = jnp.split(gates, 4, axis=-1)
  c = jax.nn.sigmoid(f + forget_bias) * s.c + jax.nn.sigmoid(i) * jnp.tanh(j)
  return cells.LSTMState(jax.nn.sigmoid(o) * jnp.tanh(c), c)


def _cell_args(rows=(5,), n_in=2, hidden=3):
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  p = cells.lstm_init(k[0], n_in, hidden)
  p["b"] = jax.random.normal(k[1], (4 * hidden,))
  x = jax.random.normal(k[2], rows + (n_in,))
  s = cells.LSTMState(jax.random.normal(k[3], rows + (hidden,)),
                      jax.random.normal(k[4], rows + (hidden,)))
  return p, x, s


@pytest.mark.parametrize("rows", [(5,), (4, 5)])
def test_lstm_written_out_gradient_matches_autodiff_of_the_textbook_cell(rows):
  p, x, s = _cell_args(rows)

  def objective(cell):  # uses both outputs, nonlinearly
    def f(p, x, s):
      out = cell(p, x, s)
      return jnp.sum(jnp.sin(3.0 * out.h)) + jnp.sum(out.c ** 2)
    return f

  ours = jax.grad(objective(cells.lstm_apply), argnums=(0, 1, 2))(p, x, s)
  ref = jax.grad(objective(_textbook_lstm), argnums=(0, 1, 2))(p, x, s)
  chex.assert_trees_all_close(ours, ref, atol=2e-6, rtol=1e-5)
  # per-example gradients (vmap of grad) and grad of grad (second-order meta-gradients)
  per_row = lambda cell: jax.vmap(jax.grad(objective(cell)), in_axes=(None, 0, 0))(p, x, s)
  chex.assert_trees_all_close(per_row(cells.lstm_apply), per_row(_textbook_lstm), atol=2e-6)
  second = lambda cell: jax.grad(
      lambda p: jnp.sum(jax.grad(objective(cell), argnums=1)(p, x, s) ** 2))(p)
  chex.assert_trees_all_close(second(cells.lstm_apply), second(_textbook_lstm), atol=2e-6,
                              rtol=1e-5)


def _textbook_stack(layers, x, states, readout):
  new = []
  for p, st in zip(layers, states):
    st = _textbook_lstm(p, x, st)
    new.append(st)
    x = st.h
  return x @ readout["w"] + readout["b"], tuple(new)


def _stack_args(rows):
  k = jax.random.split(jax.random.PRNGKey(7), 8)
  layers = [cells.lstm_init(k[0], 2, 3), cells.lstm_init(k[1], 3, 4)]
  for i, p in enumerate(layers):
    p["b"] = jax.random.normal(k[2 + i], p["b"].shape)
  readout = {"w": jax.random.normal(k[4], (4, 1)), "b": jnp.array([0.3])}
  x = jax.random.normal(k[5], rows + (2,))
  states = tuple(cells.LSTMState(jax.random.normal(jax.random.fold_in(k[6], i), rows + (h,)),
                                 jax.random.normal(jax.random.fold_in(k[7], i), rows + (h,)))
                 for i, h in enumerate((3, 4)))
  return layers, readout, x, states


def _stack_objective(out, new):  # uses the read-out and every new state, nonlinearly
  return (jnp.sum(jnp.sin(2.0 * out)) + sum(jnp.sum(jnp.cos(s.h)) + jnp.sum(s.c ** 2)
                                             for s in new))


# rows fewer than, not a multiple of, and a multiple of the gradient's partial sums
# with XLA's ops and with the fused kernels (their programs interpreted)
@pytest.mark.parametrize("rows,chunks", [((6,), 1), ((3, 6), 64), ((3, 50), 64), ((128,), 64)])
@pytest.mark.parametrize("kernel", ["xla", "pallas_interpret"])
def test_lstm_stack_gradient_matches_autodiff_of_textbook_cells(rows, chunks, kernel):
  layers, readout, x, states = _stack_args(rows)
  apply = functools.partial(cells.lstm_stack_apply, gradient_chunks=chunks, kernel=kernel)

  def objective(stack):
    return lambda layers, readout, x, states: _stack_objective(*stack(layers, x, states, readout))

  ours_out = apply(layers, x, states, readout)
  ref_out = _textbook_stack(layers, x, states, readout)
  chex.assert_trees_all_close(ours_out, ref_out, atol=2e-6, rtol=1e-5)
  args = (layers, readout, x, states)
  ours = jax.jit(jax.grad(objective(apply), argnums=(0, 1, 2, 3)))(*args)
  ref = jax.jit(jax.grad(objective(_textbook_stack), argnums=(0, 1, 2, 3)))(*args)
  chex.assert_trees_all_close(ours, ref, atol=5e-6, rtol=1e-5)
  second = lambda stack: jax.jit(jax.grad(
      lambda r: jnp.sum(jax.grad(objective(stack), argnums=2)(layers, r, x, states) ** 2)))(readout)
  chex.assert_trees_all_close(second(apply), second(_textbook_stack), atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["xla", "pallas_interpret"])
def test_lstm_stack_gradient_reaches_the_partial_sums_each_for_its_own_rows(kernel):
  layers, readout, x, states = _stack_args((10,))  # 4 partial sums of 3 rows, the last 1 + 2 pad
  f = lambda stack, x, states: _stack_objective(*cells.lstm_stack_run(stack, x, states))
  prepare = lambda k: cells.lstm_stack_prepare(layers, readout, kernel=kernel, gradient_chunks=k)
  grad_f = jax.jit(jax.grad(f))
  grad = grad_f(prepare(4), x, states)
  chex.assert_shape(grad.grad, (4, (2 + 3 + 1) * 12 + (3 + 4 + 1) * 16 + (4 + 1) * 1))
  wbs, wb_out = grad.partial_sums()
  chex.assert_shape(wbs, [(4, 2 + 3 + 1, 12), (4, 3 + 4 + 1, 16)])
  chex.assert_shape(wb_out, (4, 4 + 1, 1))
  # the other layouts of the same weights get no gradient
  assert all(not np.any(g) for g in jax.tree_util.tree_leaves(grad.layouts))
  rows = lambda tree, lo, hi: jax.tree_util.tree_map(lambda a: a[lo:hi], tree)
  for chunk, (lo, hi) in enumerate([(0, 3), (3, 6), (6, 9), (9, 10)]):
    alone = grad_f(prepare(1), x[lo:hi], rows(states, lo, hi))
    chex.assert_trees_all_close(
        jax.tree_util.tree_map(lambda a: a[chunk], grad.partial_sums()),
        jax.tree_util.tree_map(lambda a: a[0], alone.partial_sums()),
        atol=1e-6, rtol=1e-5)


def test_gradient_chunks_option_is_checked_and_defaults_to_the_backend():
  for name in ("dm", "rnnprop"):
    with pytest.raises(ValueError, match="gradient_chunks=-1"):
      models.get(name, gradient_chunks=-1)
  layers, readout, _, _ = _stack_args((4,))
  want = cells.GRADIENT_CHUNKS if jax.default_backend() == "gpu" else 1
  assert cells.lstm_stack_prepare(layers, readout).grad.shape[0] == want


def test_backprop_through_a_scan_of_the_cell_keeps_far_less_than_autodiff_would():
  p, x, s = _cell_args((4096,), n_in=2, hidden=20)

  def unrolled_loss(cell):
    def f(p):
      def body(state, _):
        state = cell(p, x, state)
        return state, None
      state, _ = jax.lax.scan(body, s, None, length=20)
      return jnp.sum(state.h)
    return jax.jit(jax.grad(f)).lower(p).compile().memory_analysis().temp_size_in_bytes

  # per step: the inputs and the [rows, 4 x hidden] tanh, not every gate and product
  assert unrolled_loss(cells.lstm_apply) < 0.6 * unrolled_loss(_textbook_lstm)


def test_backprop_through_a_scan_of_the_stack_does_not_keep_the_new_h_twice():
  k = jax.random.split(jax.random.PRNGKey(0), 4)
  layers = [cells.lstm_init(k[0], 2, 20), cells.lstm_init(k[1], 20, 20)]
  readout = cells.linear_init(k[2], 20, 1)
  x = jax.random.normal(k[3], (4096, 2))
  states = tuple(cells.lstm_zero_state(4096, 20) for _ in layers)

  def layer_by_layer(layers, x, states, readout):
    new = []
    for p, st in zip(layers, states):
      st = cells.lstm_apply(p, x, st)
      new.append(st)
      x = st.h
    return cells.linear_apply(readout, x), tuple(new)

  def temp_bytes(stack, length):
    def f(layers):
      def body(states, _):
        out, states = stack(layers, x, states, readout)
        return states, jnp.sum(out)
      _, outs = jax.lax.scan(body, states, None, length=length)
      return jnp.sum(outs ** 2)
    return jax.jit(jax.grad(f)).lower(layers).compile().memory_analysis().temp_size_in_bytes

  # what backprop keeps per step (the growth of memory with the scan's length):
  # the new h of each layer is the next step's h (kept there), recomputed from t and c
  per_step = lambda stack: (temp_bytes(stack, 40) - temp_bytes(stack, 20)) / 20
  assert per_step(cells.lstm_stack_apply) < 0.95 * per_step(layer_by_layer)


def test_transform_on_nested_pytree_and_state_threads_through_scan():
  lopt = models.dm()
  tx = lopt.transform(lopt.init(jax.random.PRNGKey(0)))
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params = _params()
  state = tx.init(params)
  chex.assert_shape(state.lstm[0].h, (21, 20))

  def body(carry, g_scale):
    p, s = carry
    grads = jax.tree_util.tree_map(lambda x: g_scale * jnp.ones_like(x), p)
    u, s2 = tx.update(grads, s, p)
    chex.assert_trees_all_equal_shapes_and_dtypes(s, s2)
    return (optax.apply_updates(p, u), s2), u

  (p, s), us = jax.lax.scan(body, (params, state), jnp.array([1.0, -1.0, 0.5]))
  chex.assert_trees_all_equal_shapes_and_dtypes(p, params)
  assert np.abs(np.asarray(us["c"])).max() < 0.1  # output scale 0.01 x Linear(h) with |h|<1
  assert not np.allclose(np.asarray(s.lstm[1].c), 0.0)


def test_update_depends_on_recurrent_state():
  lopt = models.dm()
  tx = lopt.transform(lopt.init(jax.random.PRNGKey(0)))
  params = _params()
  g = jax.tree_util.tree_map(jnp.ones_like, params)
  s0 = tx.init(params)
  u1, s1 = tx.update(g, s0, params)
  u2, _ = tx.update(g, s1, params)
  assert not np.allclose(np.asarray(u1["c"]), np.asarray(u2["c"]))


def test_usable_in_optax_chain_and_vmap():
  lopt = models.dm(preprocessing="identity", scale=1.0)
  tx = optax.chain(optax.clip_by_global_norm(1.0), lopt.transform(lopt.init(jax.random.PRNGKey(0))))
  params = {"x": jnp.zeros((4, 7))}  # a batch of 4 optimizees, 7 coordinates each
  state = jax.vmap(tx.init)(params)
  grads = {"x": jnp.ones((4, 7))}
  updates, _ = jax.jit(jax.vmap(tx.update))(grads, state, params)
  chex.assert_shape(updates["x"], (4, 7))
  chex.assert_tree_all_finite(updates)


def test_wrong_theta_is_a_clear_error():
  lopt = models.dm()
  other = models.dm(hidden_sizes=(8,)).init(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="structure"):
    lopt.transform(other)
  theta = lopt.init(jax.random.PRNGKey(0))
  theta["linear"]["w"] = jnp.zeros((3, 1))
  with pytest.raises(ValueError, match=r"linear.*shape"):
    lopt.transform(theta)


def test_state_size_mismatch_is_a_clear_error():
  lopt = models.dm()
  tx = lopt.transform(lopt.init(jax.random.PRNGKey(0)))
  state = tx.init({"x": jnp.zeros(3)})
  with pytest.raises(ValueError, match="coordinates"):
    tx.update({"x": jnp.zeros(4)}, state)


def _three_updates(lopt):
  theta = models.dm().init(jax.random.PRNGKey(0))
  tx = lopt.transform(theta)
  params = _params()
  state = tx.init(params)
  out = []
  for i in range(3):
    grads = jax.tree_util.tree_map(
        lambda p, i=i: jax.random.normal(jax.random.PRNGKey(10 + i), p.shape), params)
    updates, state = tx.update(grads, state, params)
    out.append(updates)
  return out, state


def test_bfloat16_state_is_stored_narrow_and_computed_on_in_float32():
  wide, wide_state = _three_updates(models.dm())
  narrow, narrow_state = _three_updates(models.dm(state_dtype="bfloat16"))
  assert all(s.h.dtype == jnp.bfloat16 and s.c.dtype == jnp.bfloat16
             for s in narrow_state.lstm)
  assert all(u.dtype == jnp.float32 for u in jax.tree_util.tree_leaves(narrow))
  # From the zero state the first update is computed entirely in float32: identical.
  chex.assert_trees_all_close(narrow[0], wide[0], rtol=1e-6)
  # Later ones read a rounded state: close (bfloat16 keeps ~3 significant digits), not equal.
  chex.assert_trees_all_close(narrow[2], wide[2], rtol=3e-2, atol=1e-5)
  assert not np.array_equal(np.asarray(narrow[2]["c"]), np.asarray(wide[2]["c"]))


def test_unknown_state_dtype_is_named():
  with pytest.raises(ValueError, match="state_dtype='int8'.*bfloat16"):
    models.dm(state_dtype="int8")
