"""The optimizee zoo: every registered problem is finite, trainable and vmappable."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import models, optimizees
from l2ojax.meta.unroll import rollout


@pytest.fixture(scope="module")
def color_npz(tmp_path_factory):
  """Generated 32x32x3 images (CIFAR-10's shape): the label picks a bright band and channel."""
  rng = np.random.default_rng(1)
  n = 256
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = rng.integers(0, 80, (n, 32, 32, 3)).astype(np.uint8)
  for i, y in enumerate(labels):
    images[i, :, 3 * y:3 * y + 3, y % 3] = 250
  path = tmp_path_factory.mktemp("data") / "color.npz"
  np.savez(path, images=images, labels=labels)
  return str(path)


def _build(name, tiny_image_npz, color_npz):
  if name == "quadratic":
    return optimizees.get(name, dim=5, num_instances=16)
  if name == "rosenbrock":
    return optimizees.get(name, num_instances=16)
  path = color_npz if name == "cifar_conv" else tiny_image_npz
  return optimizees.get(name, path=path, batch_size=32)


ZOO = ["quadratic", "rosenbrock", "mnist_mlp", "mnist_relu", "mnist_deeper", "fashion_mlp",
       "mnist_conv", "cifar_conv"]
ADAM_LR = {"rosenbrock": 0.05, "quadratic": 0.05}


def test_zoo_lists_every_problem():
  assert set(ZOO) <= set(optimizees.names())


@pytest.mark.parametrize("name", ZOO)
def test_finite_at_init_falls_under_adam_and_vmaps(name, tiny_image_npz, color_npz):
  opt = _build(name, tiny_image_npz, color_npz)
  assert opt.name == name
  params, inst = opt.init(jax.random.PRNGKey(0))
  l0 = opt.loss(params, inst, jax.random.PRNGKey(1))
  chex.assert_shape(l0, ())
  assert np.isfinite(l0)
  if optimizees.uses_data(name):  # N(0, 0.01) init: near-uniform predictions over 10 classes
    assert abs(float(l0) - np.log(10)) < 0.1, float(l0)

  losses = np.asarray(jax.jit(lambda k: rollout(optax.adam(ADAM_LR.get(name, 3e-2)), opt, k, 30))(
      jax.random.PRNGKey(2)))
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.9 * losses[0], losses

  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  bparams, binst = jax.vmap(opt.init)(keys)
  chex.assert_tree_shape_prefix(bparams, (4,))
  lkeys = jax.random.split(jax.random.PRNGKey(4), 4)
  blosses = jax.vmap(opt.loss)(bparams, binst, lkeys)
  chex.assert_shape(blosses, (4,))
  one = lambda i: opt.loss(*jax.tree_util.tree_map(lambda x: x[i], (bparams, binst)), lkeys[i])
  np.testing.assert_allclose(blosses, [one(i) for i in range(4)], rtol=2e-4, atol=1e-6)
  assert len(set(np.round(np.asarray(blosses), 7))) == 4  # distinct optimizees


def test_mlp_variants_have_the_papers_layouts(tiny_image_npz):
  shapes = lambda name: [l["w"].shape for l in _build(name, tiny_image_npz, None).init(
      jax.random.PRNGKey(0))[0].values()]
  assert shapes("mnist_relu") == [(80, 20), (20, 10)]
  assert shapes("mnist_deeper") == [(80, 20), (20, 20), (20, 10)]
  assert _build("mnist_relu", tiny_image_npz, None).activation == "relu"
  assert _build("mnist_deeper", tiny_image_npz, None).activation == "sigmoid"


@pytest.mark.parametrize("name,shape,dense_in", [("mnist_conv", (28, 28, 1), 7 * 7 * 32),
                                                  ("cifar_conv", (32, 32, 3), 2 * 2 * 32)])
def test_conv_layouts(name, shape, dense_in, tmp_path):
  path = tmp_path / "x.npz"
  np.savez(path, images=np.zeros((16,) + shape, np.uint8), labels=np.arange(16) % 10)
  net = optimizees.get(name, path=str(path))
  assert net.images.dtype == jnp.uint8 and net.images.shape == (16,) + shape
  params, _ = net.init(jax.random.PRNGKey(0))
  c = shape[-1]
  chex.assert_shape([params["conv_0"]["w"], params["conv_1"]["w"], params["dense"]["w"]],
                    [(3, 3, c, 16), (5, 5, 16, 32), (dense_in, 10)])
  chex.assert_shape([params["bn_0"]["scale"], params["bn_1"]["offset"]], [(16,), (32,)])
  assert net.stride == (2 if name == "cifar_conv" else 1)


def test_batch_norm_normalises_each_channel_over_the_minibatch():
  from l2ojax.optimizees.conv import batch_norm
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 5, 3)) * jnp.array([1.0, 10.0, 0.1]) + 4.0
  y = batch_norm(x, jnp.array([1.0, 2.0, 1.0]), jnp.array([0.0, 0.0, -3.0]))
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), [0.0, 0.0, -3.0], atol=1e-4)
  np.testing.assert_allclose(y.std(axis=(0, 1, 2)), [1.0, 2.0, 1.0], rtol=1e-2)


@pytest.mark.parametrize("name", ["mnist_conv", "cifar_conv"])
def test_learned_optimizer_updates_batch_norm_scale_and_offset(name, tiny_image_npz, color_npz):
  net = _build(name, tiny_image_npz, color_npz)
  params, inst = net.init(jax.random.PRNGKey(0))
  grads = jax.grad(net.loss)(params, inst, jax.random.PRNGKey(1))
  lopt = models.get("dm")
  tx = lopt.transform(lopt.init(jax.random.PRNGKey(2)))
  update = lambda g: tx.update(g, tx.init(params), params)[0]
  updates = update(grads)
  # The learned optimizer's update of a BN leaf depends on that leaf's gradient ...
  no_bn_grad = {k: (jax.tree_util.tree_map(jnp.zeros_like, v) if k.startswith("bn_") else v)
                for k, v in grads.items()}
  blind = update(no_bn_grad)
  for layer in ("bn_0", "bn_1"):
    for leaf in ("scale", "offset"):
      g, u = np.asarray(grads[layer][leaf]), np.asarray(updates[layer][leaf])
      assert np.count_nonzero(g) == g.size, (layer, leaf)
      assert np.count_nonzero(u) == u.size, (layer, leaf)
      assert not np.allclose(u, blind[layer][leaf]), (layer, leaf)
  new = optax.apply_updates(params, updates)
  assert not np.allclose(new["bn_0"]["scale"], 1.0) and not np.allclose(new["bn_1"]["offset"], 0.0)


def test_relu_on_logits_reproduces_the_papers_defect(tiny_image_npz):
  plain = _build("mnist_conv", tiny_image_npz, None)
  paper = optimizees.get("mnist_conv", path=tiny_image_npz, batch_size=32, relu_on_logits=True)
  params, _ = plain.init(jax.random.PRNGKey(0))
  images = plain.images[:32]
  assert float(plain.logits(params, images).min()) < 0
  np.testing.assert_allclose(paper.logits(params, images),
                             jax.nn.relu(plain.logits(params, images)), atol=1e-6)


def test_rosenbrock_matches_definition_and_has_its_minimum_at_a_a2():
  r = optimizees.get("rosenbrock", num_instances=6)
  params, inst = r.init(jax.random.PRNGKey(0))
  chex.assert_shape([params["xy"], inst["a"], inst["b"]], [(6, 2), (6,), (6,)])
  x, y = np.asarray(params["xy"]).T
  a, b = np.asarray(inst["a"]), np.asarray(inst["b"])
  assert np.all((0.5 <= a) & (a <= 1.5)) and np.all((10 <= b) & (b <= 100))
  np.testing.assert_allclose(r.loss(params, inst, None),
                             np.mean((a - x) ** 2 + b * (y - x**2) ** 2), rtol=1e-5)
  at_min = {"xy": jnp.stack([inst["a"], inst["a"] ** 2], axis=1)}
  assert float(r.loss(at_min, inst, None)) < 1e-10
  with pytest.raises(ValueError, match="b_range"):
    optimizees.get("rosenbrock", b_range=(5.0, 1.0))


def test_conv_bad_options_name_the_field(tiny_image_npz):
  with pytest.raises(ValueError, match="kernel_sizes"):
    optimizees.get("mnist_conv", path=tiny_image_npz, channels=(16, 32), kernel_sizes=(3,))
