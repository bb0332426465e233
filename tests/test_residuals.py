"""residuals.packed: the same function and gradient, its residuals in one array per dtype."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

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
