"""residuals.packed: the same function and gradient, its residuals in one array per dtype."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from l2ojax.models import residuals


def _step(w, h, x):
  """A recurrent step with many intermediates (and a bool mask among them)."""
  a = jnp.tanh(h @ w["a"] + x)
  b = jax.nn.sigmoid(a * w["b"]) * jnp.sin(h)
  mask = a > 0.1
  return {"h": jnp.where(mask, a * b, jnp.cos(b)), "aux": jnp.sum(b ** 2)}


def _args(key, rows=5):
  k = jax.random.split(key, 4)
  w = {"a": jax.random.normal(k[0], (3, 3)), "b": jax.random.normal(k[1], (3,))}
  return w, jax.random.normal(k[2], (rows, 3)), jax.random.normal(k[3], (rows, 3))


def test_packed_keeps_one_residual_array_per_dtype():
  w, h, x = _args(jax.random.PRNGKey(0))
  plain = jax.tree_util.tree_leaves(jax.vjp(_step, w, h, x)[1])
  ours = jax.tree_util.tree_leaves(jax.vjp(residuals.packed(_step), w, h, x)[1])
  dtypes = {jnp.result_type(a) for a in plain}
  assert len(plain) > len(dtypes) + 2  # the plain step keeps many arrays
  assert len(ours) == len(dtypes)
  assert sum(np.size(a) for a in ours) == sum(np.size(a) for a in plain)  # nothing more


def test_packed_gives_the_same_values_and_gradients_through_scan_and_vmap():
  w, h, xs = _args(jax.random.PRNGKey(1), rows=4)
  xs = jnp.stack([xs * (i + 1) for i in range(6)])

  def loss(step):
    def f(w, h0):
      def body(h, x):
        out = step(w, h, x)
        return out["h"], out["aux"]
      h, aux = jax.lax.scan(body, h0, xs)
      return jnp.sum(h ** 2) + jnp.sum(aux)
    return jax.jit(jax.vmap(jax.value_and_grad(f, argnums=(0, 1)), in_axes=(None, 0)))

  hs = jnp.stack([h, -h, 2 * h])
  want, ours = loss(_step)(w, hs), loss(residuals.packed(_step))(w, hs)
  chex.assert_trees_all_close(ours, want, atol=1e-6, rtol=1e-6)


def test_flat_gradient_sends_the_trees_gradient_to_the_vector():
  """Read through ``flat_gradient`` in a loop of steps, a pytree's meta-gradient
  arrives raveled on the vector (the same numbers as the plain gradient of the
  tree), and the tree itself gets none."""
  tree = {"a": jnp.arange(3.0), "b": {"c": jnp.full((2, 2), 0.5)}}
  flat = ravel_pytree(tree)[0]

  def loop(read):
    def body(x, _):
      t = read()
      return jnp.tanh(x * t["a"].sum() + t["b"]["c"].sum()), x
    return jnp.sum(jax.lax.scan(body, jnp.ones(4), None, length=5)[1] ** 2)

  want = jax.grad(lambda tr: loop(lambda: tr))(tree)
  d_flat, d_tree = jax.grad(
      lambda f, tr: loop(lambda: residuals.flat_gradient(f, tr)), argnums=(0, 1))(flat, tree)
  np.testing.assert_allclose(d_flat, ravel_pytree(want)[0], rtol=1e-6)
  assert np.any(d_flat != 0)
  assert all(not np.any(leaf) for leaf in jax.tree_util.tree_leaves(d_tree))
  # the forward value is the tree itself
  chex.assert_trees_all_equal(residuals.flat_gradient(flat, tree), tree)
