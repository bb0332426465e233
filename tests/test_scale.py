import importlib
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import scale_mnist
from l2ojax import models, optimizees, products
from l2ojax.models import cells
from l2ojax.meta import step as step_lib
from l2ojax.meta import trainer


def _tx(key=0, **options):
  lopt = models.scale(**options)
  theta = lopt.init(jax.random.PRNGKey(key))
  return lopt, theta, lopt.transform(theta)


def _steps(tx, params, grads_seq, values):
  """Jitted updates over a sequence; returns [(updates, state)]."""
  state = tx.init(params)
  update = jax.jit(lambda g, s, v: tx.update(g, s, params, value=v))
  out = []
  for g, v in zip(grads_seq, values):
    u, state = update(g, state, jnp.asarray(v))
    out.append((u, state))
  return out


def _rms(x):
  return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def test_first_step_momenta_direction_and_initial_learning_rates():
  _, _, tx = _tx()
  params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3), "s": jnp.zeros(())}
  g = {"w": jnp.linspace(-1.0, 2.0, 12).reshape(4, 3), "b": jnp.array([1e-6, -3e-3, 5.0]),
       "s": jnp.array(0.7)}
  s0 = tx.init(params)
  lr0 = np.exp(np.asarray(s0.log_lr))
  assert lr0.min() >= 1e-6 * (1 - 1e-5) and lr0.max() <= 1e-2 * (1 + 1e-5)
  assert lr0.std() > 0  # drawn, not constant
  chex.assert_shape(s0.tensor_h, (3, 20))  # one per-tensor state per leaf
  ((u, s1),) = _steps(tx, params, [g], [1.0])
  flat_g = np.concatenate([np.ravel(g[k]) for k in sorted(g)])
  # decays start at 0: every momentum is the gradient, every mean square its square
  np.testing.assert_allclose(s1.grad_accum, np.repeat(flat_g[:, None], 4, 1), rtol=1e-6)
  np.testing.assert_allclose(s1.ms, np.repeat(flat_g[:, None] ** 2 + 1e-12, 4, 1), rtol=1e-5)
  # the untrained lr read-out is zero: step = exp(log_lr0 - 1) x a unit-RMS direction per tensor
  offset = 0
  for k in sorted(g):
    n = int(np.size(g[k]))
    step_size = np.exp(np.asarray(s0.log_lr[offset:offset + n]) - 1.0)
    direction = np.ravel(u[k]) / step_size
    assert abs(_rms(direction) - 1.0) < 1e-4, k
    offset += n


def test_momentum_time_scales_follow_the_learned_decay():
  _, _, tx = _tx()
  params = {"x": jnp.zeros(6)}
  g1, g2 = {"x": jnp.arange(1.0, 7.0)}, {"x": -jnp.arange(1.0, 7.0) ** 2}
  (_, s1), (_, s2) = _steps(tx, params, [g1, g2], [1.0, 0.9])
  d0 = np.asarray(s1.inp_decay)
  assert 0.5 < d0.min() and d0.max() < 1.0  # sigmoid(2.2 + small) ~ 0.9
  for i in range(4):
    d = d0 ** (0.5 ** i)  # each momentum on twice the time scale of the one before
    want = np.asarray(g2["x"]) * (1 - d) + np.asarray(g1["x"]) * d
    np.testing.assert_allclose(s2.grad_accum[:, i], want, rtol=1e-4)


def test_per_tensor_level_sees_the_pytree_structure():
  _, _, tx = _tx()
  g = jnp.array([1.0, 2.0, 3.0, -1e-3, -2e-3, -3e-3])
  one = _steps(tx, {"a": jnp.zeros(6)}, [{"a": g}], [1.0])[0][0]["a"]
  two = _steps(tx, {"a": jnp.zeros(3), "b": jnp.zeros(3)}, [{"a": g[:3], "b": g[3:]}], [1.0])[0][0]
  split = jnp.concatenate([two["a"], two["b"]])
  assert not np.allclose(np.asarray(one), np.asarray(split), rtol=1e-3)


def test_per_tensor_means_and_broadcasts_match_segment_sums_without_a_scatter():
  scale_lib = importlib.import_module("l2ojax.models.scale")
  sizes = (3, 0, 1, 4)  # an empty leaf too
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 5))
  seg = np.repeat(np.arange(len(sizes)), sizes)
  sums = jax.ops.segment_sum(x, seg, num_segments=len(sizes))
  want = sums / np.maximum(np.array(sizes), 1)[:, None]
  np.testing.assert_allclose(scale_lib._tensor_means(x, sizes), want, rtol=1e-6, atol=1e-7)
  t = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
  np.testing.assert_array_equal(scale_lib._per_coordinate(t, sizes), t[seg])

  # the whole update, and its meta-gradient, lower to no scatter or gather
  _, theta, _ = _tx()
  params = {"a": jnp.ones((3, 4)), "b": {"c": jnp.arange(5.0), "d": jnp.ones(())}}

  def loss(theta):
    tx = models.scale().transform(theta)
    u, _ = tx.update(params, tx.init(params), params, value=jnp.asarray(1.0))
    return sum(jnp.sum(jnp.sin(v)) for v in jax.tree_util.tree_leaves(u))

  text = jax.jit(jax.grad(loss)).lower(theta).as_text()
  assert "scatter" not in text and "gather" not in text


def test_loss_value_arrives_through_extra_args():
  lopt, theta, tx = _tx()
  params = {"x": jnp.zeros(4)}
  g = {"x": jnp.array([0.1, -0.2, 0.3, -0.4])}
  with pytest.raises(ValueError, match="value=loss"):
    tx.update(g, tx.init(params), params)
  # loss_input=False: the original model, no loss needed
  plain = models.scale(loss_input=False)
  ptx = plain.transform(plain.init(jax.random.PRNGKey(0)))
  u, _ = ptx.update(g, ptx.init(params), params)
  chex.assert_tree_all_finite(u)

  def third_update(tx, second_loss):
    return _steps(tx, params, [g, g, g], [1.0, second_loss, 0.5])[-1][0]["x"]

  # the loss weights start at zero: an untrained model ignores the loss, like the original
  np.testing.assert_allclose(third_update(tx, 0.9), third_update(tx, 1e-3), rtol=1e-6)
  t = lopt.level_sizes[1]
  theta2 = jax.tree_util.tree_map(lambda x: x, theta)
  theta2["global_gru"]["w_gates"] = theta2["global_gru"]["w_gates"].at[t].set(1.0)
  theta2["global_gru"]["w_cand"] = theta2["global_gru"]["w_cand"].at[t].set(1.0)
  tx2 = lopt.transform(theta2)
  assert not np.allclose(np.asarray(third_update(tx2, 0.9)), np.asarray(third_update(tx2, 1e-3)))


def test_short_meta_training_lowers_the_log_ratio_meta_loss():
  q = optimizees.get("quadratic", dim=5, num_instances=16)
  lopt = models.scale()
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.adam(1e-2)
  outer_state = outer.init(theta)
  init_states = step_lib.make_init_states(lopt, 8)
  meta_step = step_lib.make_meta_step(lopt, outer, segment_length=10, meta_loss="log_ratio")
  key = jax.random.PRNGKey(1)
  history = []
  for _ in range(30):
    key, k_init, k_ep = jax.random.split(key, 3)
    states = init_states(theta, k_init, q)
    total = 0.0
    for k in jax.random.split(k_ep, 2):
      theta, outer_state, states, m = meta_step(theta, outer_state, states, k, q)
      assert int(m["skipped"]) == 0
      total += float(m["meta_loss"])
    history.append(total)
  assert np.mean(history[-5:]) < np.mean(history[:5]) - 0.5, history


def test_outer_optimizer_clips_by_value_and_zeroes_nans():
  meta = scale_mnist.get_config().meta
  outer = trainer.build_outer_optimizer(meta)
  theta = {"w": jnp.zeros(4)}
  grads = {"w": jnp.array([jnp.nan, 1e9, -1e9, 1.0])}
  updates, _ = outer.update(grads, outer.init(theta), theta)
  u = np.asarray(updates["w"])
  assert np.all(np.isfinite(u)) and u[0] == 0.0
  assert u[1] < 0 < u[2]  # clipped, not dropped
  assert np.abs(u).max() < 1e-4  # RMSProp at 1e-6


@pytest.mark.slow
def test_scale_mnist_config_trains(tmp_path, tiny_image_npz):
  c = scale_mnist.get_config()
  assert (c.model.name, c.meta.loss, c.meta.optimizer) == ("scale", "log_ratio", "rmsprop")
  c.data.path = tiny_image_npz
  c.meta.batch_size = 2
  c.meta.num_episodes = 2
  c.meta.episode_steps = 40
  c.validation.period = 2
  c.validation.num_optimizees = 2
  c.validation.steps = 20
  result = trainer.train(c, str(tmp_path), progress=False)
  assert result.lopt.name == "scale"
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert len(rows) == 2 and np.isfinite(rows[-1]["val_loss"])


def _textbook_gru(params, x, h, bias=None):
  n_in = x.shape[-1]
  w_g, w_c = params["w_gates"], params["w_cand"]
  r_lin, u_lin = jnp.split(x @ w_g[:n_in] + h @ w_g[n_in:] + params["b_gates"], 2, axis=-1)
  b_r = b_u = b_c = 0.0
  if bias is not None:
    b_r, b_u, b_c = jnp.split(bias, 3, axis=-1)
  r, u = jax.nn.sigmoid(r_lin + b_r), jax.nn.sigmoid(u_lin + b_u)
  c = jnp.tanh(x @ w_c[:n_in] + (r * h) @ w_c[n_in:] + params["b_cand"] + b_c)
  return u * h + (1.0 - u) * c


# up to products.SMALL_ROWS rows the products are written elementwise; above, as matrix products
@pytest.mark.parametrize("rows,bias_shape", [((5,), None), ((5,), (12,)), ((5,), (5, 12)),
                                             ((2, 5), (2, 5, 12)), ((100,), (100, 12)),
                                             ((2, 70), (2, 70, 12))])
def test_gru_written_out_gradient_matches_autodiff_of_the_textbook_cell(rows, bias_shape):
  k = jax.random.split(jax.random.PRNGKey(0), 5)
  params = cells.gru_init(k[0], 3, 4)
  params["b_cand"] = jax.random.normal(k[4], (4,))
  x, h = jax.random.normal(k[1], rows + (3,)), jax.random.normal(k[2], rows + (4,))
  bias = None if bias_shape is None else jax.random.normal(k[3], bias_shape)

  def objective(cell):
    return lambda p, x, h, b: jnp.sum(jnp.sin(3.0 * cell(p, x, h, b)))

  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
  np.testing.assert_allclose(cells.gru_apply(params, x, h, bias),
                             _textbook_gru(params, x, h, bias), atol=1e-6)
  ours = jax.jit(jax.grad(objective(cells.gru_apply), argnums))(params, x, h, bias)
  ref = jax.grad(objective(_textbook_gru), argnums)(params, x, h, bias)
  chex.assert_trees_all_close(ours, ref, atol=2e-6, rtol=1e-5)
  second = lambda cell: jax.grad(
      lambda p: jnp.sum(jax.grad(objective(cell), 1)(p, x, h, bias) ** 2))(params)
  chex.assert_trees_all_close(second(cells.gru_apply), second(_textbook_gru), atol=2e-6,
                              rtol=1e-5)


def test_weights_gradient_over_many_rows_is_split_into_chunks_that_divide_them():
  # the MNIST MLP's 15,910 coordinates: 37 chunks of 430 rows, no padding
  assert products.row_chunks(15910) == 37 and 15910 % 37 == 0
  assert products.row_chunks(4099) == 1  # a prime: one product
  assert products.row_chunks(1024) == 2 and products.row_chunks(100) == 1
  k = jax.random.split(jax.random.PRNGKey(0), 2)
  a, d = jax.random.normal(k[0], (15910, 23)), jax.random.normal(k[1], (15910, 20))
  np.testing.assert_allclose(products.chunked_summed_outer(a, d, 37), a.T @ d, rtol=1e-4,
                             atol=1e-3)
  # lowered for CUDA, one batched product over the chunks and no padded copy; elsewhere
  # one product over all rows
  for platform, product in (("cuda", "tensor<37x430x23xf32>"), ("cpu", "tensor<15910x20xf32>")):
    exported = jax.export.export(jax.jit(products.summed_outer), platforms=[platform])(a, d)
    text = exported.mlir_module()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 1 and product in dots[0], (platform, dots)
    assert "stablehlo.pad" not in text


@pytest.mark.parametrize("rows", [(7,), (3, 5), (100,), (4, 40)])
def test_products_with_weights_match_matrix_products_and_their_gradients(rows):
  """products.matmul (elementwise up to SMALL_ROWS rows), products.rows_matmul and
  products.rows_linear (their weights' gradients summed chunk-wise) against a @ w (+ b),
  to second order."""
  k = jax.random.split(jax.random.PRNGKey(1), 2)
  a, w = jax.random.normal(k[0], rows + (6,)), jax.random.normal(k[1], (6, 3))
  objective = lambda f: (lambda a, w: jnp.sum(jnp.sin(f(a, w))))
  plain = lambda a, w: a @ w
  for f in (products.matmul, products.rows_matmul):
    np.testing.assert_allclose(f(a, w), plain(a, w), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(jax.grad(objective(f), (0, 1))(a, w),
                                jax.grad(objective(plain), (0, 1))(a, w), rtol=1e-5, atol=1e-5)
    second = lambda f: jax.grad(lambda w: jnp.sum(jax.grad(objective(f))(a, w) ** 2))(w)
    np.testing.assert_allclose(second(f), second(plain), rtol=1e-4, atol=1e-4)
  b = jax.random.normal(jax.random.PRNGKey(2), (3,))
  linear = lambda f: (lambda a, w, b: jnp.sum(jnp.sin(f(a, w, b))))
  ours, ref = linear(products.rows_linear), linear(lambda a, w, b: a @ w + b)
  chex.assert_trees_all_close(jax.grad(ours, (0, 1, 2))(a, w, b),
                              jax.grad(ref, (0, 1, 2))(a, w, b), rtol=1e-5, atol=1e-5)
  second = lambda f: jax.grad(lambda b: jnp.sum(jax.grad(f, 1)(a, w, b) ** 2))(b)
  np.testing.assert_allclose(second(ours), second(ref), rtol=1e-4, atol=1e-4)
