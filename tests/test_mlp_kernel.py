"""The fused MLP loss-and-gradient kernel (l2ojax/optimizees/mlp_kernel.py)
against autodiff of the MLP's loss.

Off a GPU the kernel's program runs interpreted (kernel="pallas_interpret"):
the same program, so these tests check its gathering, chunking, masking and
softmax algebra; ``test_kernel_lowers_for_gpu`` checks that it lowers to two
Triton kernels; ``test_fused_mlp_on_gpu`` runs it compiled where a GPU exists.
"""
import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import models, optimizees
from l2ojax.meta import step as step_lib
from l2ojax.meta.unroll import batch_rollout
from l2ojax.optimizees import mlp_kernel
from tests.helpers.lowering import lower_for_cuda


def _mlp(path, kernel, **options):
  return optimizees.get("mnist_mlp", path=path, kernel=kernel, **options)


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh"])
@pytest.mark.parametrize("batch_size", [16, 100])
def test_value_and_grad_match_autodiff(tiny_image_npz, activation, batch_size):
  """80 input columns (a chunk of 64 and a masked one of 16), 10 of 16 class lanes,
  20 of 32 hidden lanes; 100 rows of a 128-row tile. Weights scaled up (std 1) so that
  the loss is far from log(10) and every term of the gradient matters."""
  mlps = {k: _mlp(tiny_image_npz, k, activation=activation, batch_size=batch_size)
          for k in ("xla", "pallas_interpret")}
  params, instance = mlps["xla"].init(jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda p: 100.0 * p, params)
  idx = mlps["xla"].minibatch(jax.random.PRNGKey(1))
  want = mlps["xla"].batch_value_and_grad(params, instance, idx)
  got = mlps["pallas_interpret"].batch_value_and_grad(params, instance, idx)
  assert abs(float(want[0]) - np.log(10)) > 0.05
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)


@pytest.mark.parametrize("chunk,per_program", [(16, 1), (16, 2), (32, 3)])
def test_columns_split_over_programs(tiny_image_npz, monkeypatch, chunk, per_program):
  """The first layer's columns split over programs in other ways: 80 columns as 5
  chunks of 16 (5 programs; 3 programs, the last with one chunk past the inputs) and
  as 3 chunks of 32 in one program. Every program adds its columns' product to the
  hidden layer and writes its columns' weight gradient; one writes the rest."""
  monkeypatch.setattr(mlp_kernel, "CHUNK", chunk)
  monkeypatch.setattr(mlp_kernel, "CHUNKS_PER_PROGRAM", per_program)
  mlp = _mlp(tiny_image_npz, "pallas_interpret", batch_size=16)
  params, instance = mlp.init(jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda p: 100.0 * p, params)
  idx = mlp.minibatch(jax.random.PRNGKey(1))
  got = mlp.batch_value_and_grad(params, instance, idx)
  want = jax.value_and_grad(mlp.batch_loss)(params, instance, idx)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)


def test_rows_drawn_twice_and_rows_outside_the_batch(tiny_image_npz):
  """A minibatch drawn with replacement (one row 5 times) weighs that row 5 times;
  the gradient is that of the mean over the drawn rows, nothing else."""
  mlp = _mlp(tiny_image_npz, "pallas_interpret", batch_size=16)
  params, instance = mlp.init(jax.random.PRNGKey(0))
  idx = jnp.asarray([3] * 5 + list(range(100, 111)), jnp.int32)
  got = mlp.batch_value_and_grad(params, instance, idx)
  want = jax.value_and_grad(mlp.batch_loss)(params, instance, idx)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)


def test_rollouts_and_meta_gradient_through_vmap_and_scan(tiny_image_npz):
  """Inside the unroll (vmapped over optimizees, scanned over steps): the same Adam
  curves, and the same first-order meta-step of L2O-DM, as autodiff's."""
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  curves = {k: batch_rollout(optax.adam(0.05), _mlp(tiny_image_npz, k, batch_size=16), keys, 8)
            for k in ("xla", "pallas_interpret")}
  np.testing.assert_allclose(curves["pallas_interpret"], curves["xla"], rtol=1e-5)
  assert curves["xla"][:, -1].mean() < curves["xla"][:, 0].mean() - 0.1  # it trains

  outs = {}
  for k in ("xla", "pallas_interpret"):
    mlp = _mlp(tiny_image_npz, k, batch_size=16)
    lopt = models.dm()
    theta = lopt.init(jax.random.PRNGKey(0))
    states = step_lib.make_init_states(lopt, 2)(theta, jax.random.PRNGKey(1), mlp)
    meta_step = step_lib.make_meta_step(lopt, optax.sgd(1.0), 4)
    theta, _, _, metrics = meta_step(theta, optax.sgd(1.0).init(theta), states,
                                     jax.random.PRNGKey(2), mlp)
    outs[k] = (theta, metrics["meta_loss"])
  chex.assert_trees_all_close(outs["pallas_interpret"], outs["xla"], atol=1e-6, rtol=1e-5)


def test_a_gradient_through_the_kernel_differentiates_xlas_ops(tiny_image_npz):
  """A second-order unroll differentiates the step's gradient: the fused version
  takes XLA's derivative (Hessian-vector products), the same values."""
  unroll_lib = importlib.import_module("l2ojax.meta.unroll")
  lopt = models.dm()
  theta = lopt.init(jax.random.PRNGKey(0))

  def meta_loss(theta, kernel):
    mlp = _mlp(tiny_image_npz, kernel, batch_size=16)
    tx = lopt.transform(theta)
    state = unroll_lib.init_state(tx, mlp, jax.random.PRNGKey(1))
    _, losses = unroll_lib.unroll(tx, mlp, state, jax.random.PRNGKey(2), 3, second_order=True)
    return jnp.sum(losses)

  got = jax.grad(meta_loss)(theta, "pallas_interpret")
  want = jax.grad(meta_loss)(theta, "xla")
  chex.assert_trees_all_close(got, want, atol=1e-7, rtol=1e-4)


def test_kernel_lowers_for_gpu(tiny_image_npz):
  """kernel="pallas": two Triton calls per step where lowered for CUDA, XLA's ops for the CPU."""
  mlp = _mlp(tiny_image_npz, "pallas", batch_size=16)
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  run = jax.jit(lambda ks: batch_rollout(optax.adam(0.01), mlp, ks, 4))
  assert lower_for_cuda(run, keys).as_text().count("__gpu$xla.gpu.triton") == 2
  assert "triton" not in run.trace(keys).lower(lowering_platforms=("cpu",)).as_text()


@pytest.mark.parametrize("options,match", [
    ({"hidden_sizes": (20, 20)}, r"one hidden layer; hidden_sizes=\(20, 20\)"),
    ({"batch_size": 1024}, r"batch_size=1024 > 512"),
    ({"hidden_sizes": (200,)}, r"hidden_sizes\[0\]=200 > 128"),
])
def test_sizes_the_kernel_cannot_take_are_named(tiny_image_npz, options, match):
  with pytest.raises(ValueError, match=match):
    _mlp(tiny_image_npz, "pallas", **options)
  _mlp(tiny_image_npz, "xla", **options)  # XLA's ops take any


def test_an_unknown_kernel_is_named(tiny_image_npz):
  with pytest.raises(ValueError, match=r"kernel='triton'; allowed"):
    _mlp(tiny_image_npz, "triton")


def test_params_that_are_not_a_one_hidden_layer_mlp_are_named():
  params = {"layer_0": {"w": jnp.zeros((12, 4)), "b": jnp.zeros(4)},
            "layer_1": {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}}
  with pytest.raises(ValueError, match=r"one-hidden-layer MLP's params"):
    mlp_kernel.layout(params, flat=True)
  params["layer_1"]["w"] = jnp.zeros((4, 3))
  at = mlp_kernel.layout(params, flat=True)  # ravel_pytree's order: b1, w1, b2, w2
  assert at.where == ((0, 4), (0, 0), (0, 55), (0, 52)) and at.sizes == (67,)
  leafwise = mlp_kernel.layout(params, flat=False)
  assert leafwise.sizes == (48, 4, 12, 3) and leafwise.where[2] == (2, 0)
  assert leafwise.flat_offsets == at.flat_offsets == (4, 0, 55, 52)  # the gradient: flat
  with pytest.raises(ValueError, match=r"do not fit 10 inputs"):
    mlp_kernel.value_and_grad(jnp.zeros((6, 10), jnp.uint8), jnp.zeros(6, jnp.int32),
                              jnp.zeros(4, jnp.int32), (jnp.zeros(67),), at, "sigmoid",
                              interpret=True)


def test_the_flat_and_the_leafwise_layouts_agree(tiny_image_npz):
  """On the flat vector an unroll carries, and on the leaves: the same loss and gradient."""
  from jax.flatten_util import ravel_pytree
  mlp = _mlp(tiny_image_npz, "pallas_interpret", batch_size=16)
  params, instance = mlp.init(jax.random.PRNGKey(0))
  idx = mlp.minibatch(jax.random.PRNGKey(1))
  flat, unravel = ravel_pytree(params)
  loss, flat_grad = mlp.flat_batch_value_and_grad(flat, unravel, instance, idx)
  want = jax.value_and_grad(mlp.batch_loss)(params, instance, idx)
  chex.assert_trees_all_close((loss, unravel(flat_grad)), want, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(mlp.batch_value_and_grad(params, instance, idx), want,
                              atol=1e-6, rtol=1e-5)


def test_a_jax_without_pallas_triton_is_named(monkeypatch, tiny_image_npz):
  import sys
  import jax.experimental.pallas as pallas
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
  monkeypatch.delattr(pallas, "triton", raising=False)
  mlp = _mlp(tiny_image_npz, "pallas_interpret", batch_size=16)
  params, instance = mlp.init(jax.random.PRNGKey(0))
  with pytest.raises(ImportError, match=r"fused MLP kernel needs Pallas's Triton.*kernel='xla'"):
    mlp.batch_value_and_grad(params, instance, mlp.minibatch(jax.random.PRNGKey(1)))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the kernel: needs a GPU")
def test_fused_mlp_on_gpu(tiny_image_npz):
  """Compiled on a GPU: the same loss and gradient as XLA's ops (both TF32 products),
  and the same Adam curves."""
  mlps = {k: _mlp(tiny_image_npz, k, batch_size=100) for k in ("xla", "pallas")}
  params, instance = mlps["xla"].init(jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda p: 100.0 * p, params)
  idx = mlps["xla"].minibatch(jax.random.PRNGKey(1))
  got, want = (jax.jit(mlps[k].batch_value_and_grad)(params, instance, idx)
               for k in ("pallas", "xla"))
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, atol=5e-3 * float(jnp.max(jnp.abs(w))))
  keys = jax.random.split(jax.random.PRNGKey(2), 4)
  curves = {k: batch_rollout(optax.adam(0.05), mlps[k], keys, 50) for k in ("xla", "pallas")}
  np.testing.assert_allclose(np.log(curves["pallas"]), np.log(curves["xla"]), atol=2e-2)
  lowered = jax.jit(lambda ks: batch_rollout(optax.adam(0.05), mlps["pallas"], ks, 5)).lower(keys)
  assert "__gpu$xla.gpu.triton" in lowered.as_text()
