"""The fused LSTM-stack kernel (l2ojax/models/lstm_kernel.py) against XLA's ops.

Off a GPU the kernel's program runs interpreted ("pallas_interpret"): the same
program, so these tests check its indexing, masking, padding and gate
algebra; ``test_kernel_lowers_for_gpu`` checks that it lowers to a Triton
kernel; ``test_fused_kernel_on_gpu`` runs it compiled where a GPU exists.
"""
import dataclasses
import importlib
import re
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import ad_checkpoint
import pytest

from l2ojax import models, optimizees
from l2ojax.meta.unroll import batch_rollout
from l2ojax.optimizees import quadratic
from tests.helpers.lowering import lower_for_cuda

cells = importlib.import_module("l2ojax.models.cells")
lstm_kernel = importlib.import_module("l2ojax.models.lstm_kernel")


def _stack(key, n_in, sizes, n_out=1, lead=(300,), state_dtype=jnp.float32):
  keys = iter(jax.random.split(key, 3 * len(sizes) + 3))
  layers, size = [], n_in
  for h in sizes:
    layers.append(cells.lstm_init(next(keys), size, h))
    layers[-1]["b"] = 0.1 * jax.random.normal(next(keys), layers[-1]["b"].shape)
    size = h
  readout = cells.linear_init(next(keys), size, n_out)
  x = jax.random.normal(next(keys), lead + (n_in,))
  states = tuple(cells.LSTMState(jax.random.normal(next(keys), lead + (h,)).astype(state_dtype),
                                 jnp.asarray(2.0, state_dtype) * jnp.ones(lead + (h,), state_dtype))
                 for h in sizes)
  return layers, readout, x, states


@pytest.mark.parametrize("n_in,sizes,n_out", [(2, (20, 20), 1), (20, (20, 20), 1), (3, (33,), 2)])
def test_the_kernels_flat_gradient_layout_is_the_stacks(n_in, sizes, n_out):
  """lstm_kernel.gradient_offsets (where the gradient kernel writes each matrix) and
  LSTMStack.partial_sums (how the stack reads them back) split the same vector."""
  layers, readout, _, _ = _stack(jax.random.PRNGKey(0), n_in, sizes, n_out)
  stack = cells.lstm_stack_prepare(layers, readout, gradient_chunks=2)
  offsets = lstm_kernel.gradient_offsets(n_in, sizes, n_out)
  assert offsets[-1] == stack.grad.shape[1]
  stack = dataclasses.replace(stack, grad=jnp.broadcast_to(
      jnp.arange(stack.grad.shape[1], dtype=jnp.float32), stack.grad.shape))
  layer_parts, out_part = stack.partial_sums()
  firsts = [int(p[0].reshape(-1)[0]) for p in (*layer_parts, out_part)]
  sizes_read = [p[0].size for p in (*layer_parts, out_part)]
  assert firsts == list(offsets[:-1])
  assert sizes_read == list(np.diff(offsets))


@pytest.mark.parametrize("n_in,sizes,n_out,lead", [
    (2, (20, 20), 1, (300,)),      # L2O-DM: rows not a multiple of the block
    (20, (20, 20), 1, (2, 70)),    # RNNProp's stack; leading dims
    (3, (33,), 2, (129,)),         # a hidden size padded to 64, two read-outs
])
def test_kernel_matches_xla_stack(n_in, sizes, n_out, lead):
  layers, readout, x, states = _stack(jax.random.PRNGKey(0), n_in, sizes, n_out, lead)
  want = cells.lstm_stack_apply(layers, x, states, readout)
  got = cells.lstm_stack_apply(layers, x, states, readout, kernel="pallas_interpret")
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  chex.assert_trees_all_close(got, want, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("key", [1, 3])
def test_kernel_with_bfloat16_state(key):
  """The kernel reads and writes a bfloat16 state in bfloat16 and rounds the new state
  as XLA's ops do (to nearest): the same values, bar a float32 result that lies
  at a rounding boundary."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(key), 2, (20, 20),
                                      state_dtype=jnp.bfloat16)
  want = cells.lstm_stack_apply(layers, x, states, readout)
  got = cells.lstm_stack_apply(layers, x, states, readout, kernel="pallas_interpret")
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(got[1]))
  chex.assert_trees_all_close(got[0], want[0], atol=2e-6, rtol=2e-6)
  new_got, new_want = (np.concatenate([np.asarray(a, np.float32).ravel()
                                       for a in jax.tree_util.tree_leaves(t[1])])
                       for t in (got, want))
  np.testing.assert_allclose(new_got, new_want, rtol=2 ** -7)  # one bfloat16 ulp
  assert np.mean(new_got == new_want) > 0.99


def test_a_bfloat16_state_is_saved_narrow_with_x_beside_it(capsys):
  """Backprop keeps a bfloat16 state's step as one bfloat16 array [x_hi, x_lo, h's, c's];
  x is recovered from it to ~2^-16 (float32 keeps 2^-24), the state exactly."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(4), 2, (20, 20), lead=(100,),
                                      state_dtype=jnp.bfloat16)
  x = x * 1e-3 + 0.37
  stack = cells.lstm_stack_prepare(layers, readout, kernel="pallas_interpret")
  hs, cs = [s.h for s in states], [s.c for s in states]
  saved = cells._saved_inputs(x, hs, cs)
  assert saved.dtype == jnp.bfloat16 and saved.shape == (100, 2 * 2 + 4 * 20)
  x_back, hs_back, cs_back = cells._split_inputs(stack.layouts, saved)
  np.testing.assert_allclose(x_back, x, rtol=2 ** -15)
  assert not np.allclose(x.astype(jnp.bfloat16).astype(jnp.float32), x, rtol=2 ** -15)
  chex.assert_trees_all_equal([a.astype(jnp.bfloat16) for a in hs_back + cs_back], hs + cs)

  capsys.readouterr()
  ad_checkpoint.print_saved_residuals(lambda x, s: cells.lstm_stack_run(stack, x, s), x, states)
  per_row = re.findall(r"^(\w+)\[100,(\d+)\]", capsys.readouterr().out, re.M)
  assert per_row == [("bf16", "84")]  # the weights aside, nothing else per row


def test_kernel_under_vmap():
  layers, readout, x, states = _stack(jax.random.PRNGKey(2), 2, (20, 20), lead=(3, 150))
  stack = cells.lstm_stack_prepare(layers, readout, kernel="pallas_interpret")
  batched = jax.vmap(lambda x, s: cells.lstm_stack_run(stack, x, s))(x, states)
  chex.assert_trees_all_close(batched, cells.lstm_stack_apply(layers, x, states, readout),
                              atol=2e-6, rtol=2e-6)


def _forward_grids(f, *args):
  """The grids of the forward kernel's calls in ``f``'s program."""
  text = str(jax.make_jaxpr(f)(*args))
  return [tuple(int(d) for d in g.split(",") if d.strip())
          for g in re.findall(r"GridMapping\(grid=\(([^)]*)\)", text)]


@pytest.mark.parametrize("n_in", [2, 20])  # L2O-DM's packed first layer, RNNProp's
def test_forward_kernel_loops_over_the_optimizees_folded_rows(monkeypatch, n_in):
  """lstm_kernel.FORWARD_PROGRAMS_PER_CORE: under vmap (and vmap of vmap) over optimizees
  sharing the weights, one call of the forward kernel on their rows folded together
  (3 x 150 = 450 rows, 8 blocks of 64) by 2 programs of 4 blocks, the last one past the
  rows in part: XLA's outputs, and the meta-gradient of a loop of steps."""
  monkeypatch.setattr(lstm_kernel, "FORWARD_PROGRAMS_PER_CORE", 1)
  monkeypatch.setattr(lstm_kernel, "CORES_OFF_GPU", 2)
  layers, readout, x, states = _stack(jax.random.PRNGKey(2), n_in, (20, 20), lead=(3, 150))
  stack = cells.lstm_stack_prepare(layers, readout, kernel="pallas_interpret")
  run = jax.vmap(lambda x, s: cells.lstm_stack_run(stack, x, s))
  assert _forward_grids(run, x, states) == [(2,)]
  want = cells.lstm_stack_apply(layers, x, states, readout)
  chex.assert_trees_all_close(run(x, states), want, atol=2e-6, rtol=2e-6)
  halves = lambda a: a.reshape((3, 2, 75) + a.shape[2:])
  x2, states2 = jax.tree_util.tree_map(halves, (x, states))
  nested = jax.vmap(jax.vmap(lambda x, s: cells.lstm_stack_run(stack, x, s)))
  assert _forward_grids(nested, x2, states2) == [(2,)]
  chex.assert_trees_all_close(nested(x2, states2), jax.tree_util.tree_map(halves, want),
                              atol=2e-6, rtol=2e-6)
  grad = jax.jit(jax.grad(_loop_loss, argnums=(0, 1)), static_argnums=4)
  chex.assert_trees_all_close(grad(layers, readout, x, states, "pallas_interpret"),
                              grad(layers, readout, x, states, "xla"), atol=1e-5, rtol=1e-5)
  # off: a grid row of 3 programs per optimizee, as Pallas batches a call
  monkeypatch.setattr(lstm_kernel, "FORWARD_PROGRAMS_PER_CORE", 0)
  run = jax.vmap(lambda x, s: cells.lstm_stack_run(stack, x, s))  # traced anew
  assert _forward_grids(run, x, states) == [(3, 3)]


def test_forward_kernel_with_weights_per_optimizee_keeps_pallas_batching(monkeypatch):
  """Weights that differ along the mapped axis are not folded: Pallas's grid row per
  member, each with its own weights, of 2 programs looping over its 3 blocks (XLA's
  outputs)."""
  monkeypatch.setattr(lstm_kernel, "FORWARD_PROGRAMS_PER_CORE", 1)
  monkeypatch.setattr(lstm_kernel, "CORES_OFF_GPU", 2)
  members = [_stack(jax.random.PRNGKey(k), 2, (20, 20), lead=(150,)) for k in (3, 4)]
  layers, readout, x, states = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *members)
  apply = lambda kernel: jax.vmap(lambda layers, readout, x, s: cells.lstm_stack_apply(
      layers, x, s, readout, kernel=kernel))
  assert _forward_grids(apply("pallas_interpret"), layers, readout, x, states) == [(2, 2)]
  chex.assert_trees_all_close(apply("pallas_interpret")(layers, readout, x, states),
                              apply("xla")(layers, readout, x, states), atol=2e-6, rtol=2e-6)


def test_forward_stride_takes_as_many_rounds_as_one_block_per_program(monkeypatch):
  """L2O-DM's 15,910 rows per optimizee at 3 programs on each of 132 multiprocessors."""
  monkeypatch.setattr(lstm_kernel, "FORWARD_PROGRAMS_PER_CORE", 3)
  assert lstm_kernel.forward_stride(15910, 132) is None  # 249 blocks: one round
  for batch in (2, 8, 10, 64, 256):
    blocks = -(-15910 * batch // lstm_kernel.BLOCK_ROWS)
    programs, per = lstm_kernel.forward_stride(15910 * batch, 132)
    assert programs <= 3 * 132
    assert per == -(-blocks // (3 * 132))  # the rounds one program per block would take
    assert (programs - 1) * per < blocks <= programs * per  # no program without a block
  assert lstm_kernel.forward_stride(15910 * 10, 132) == (356, 7)
  monkeypatch.setattr(lstm_kernel, "FORWARD_PROGRAMS_PER_CORE", 0)
  assert lstm_kernel.forward_stride(15910 * 64, 132) is None


@pytest.mark.parametrize("n_in,sizes,n_out,state_dtype", [
    (2, (20, 20), 1, jnp.float32),     # L2O-DM: x in the padding lanes of layer 0's h
    (20, (20, 20), 1, jnp.float32),    # RNNProp's stack: x beside h does not fit in 32
    (3, (33,), 2, jnp.float32),        # one layer (no layer below the top), padded to 64
    (2, (20, 20), 1, jnp.bfloat16),    # a bfloat16 state, computed on in float32
])
def test_gradients_through_the_fused_kernels(n_in, sizes, n_out, state_dtype):
  """Differentiated, the fused forward kernel keeps the inputs and the fused backward
  kernel gives XLA's gradients for every input (a bfloat16 state's to its rounding)."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(3), n_in, sizes, n_out, (200,),
                                      state_dtype)

  # cotangents of the new states independent of them: a bfloat16 new state may round
  # one ulp apart on the two paths (test_kernel_with_bfloat16_state)
  weights = [jax.random.normal(k, s.h.shape) for k, s in
             zip(jax.random.split(jax.random.PRNGKey(7), 2 * len(states)), states * 2)]

  def loss(layers, readout, x, states, kernel):
    out, new = cells.lstm_stack_apply(layers, x, states, readout, kernel=kernel,
                                      gradient_chunks=3)
    carried = [s.h for s in new] + [s.c for s in new]
    return jnp.sum(out ** 2) + sum(jnp.sum(w * a.astype(jnp.float32))
                                   for w, a in zip(weights, carried))

  grad = jax.grad(loss, argnums=(0, 1, 2, 3))
  want = grad(layers, readout, x, states, "xla")
  got = grad(layers, readout, x, states, "pallas_interpret")
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  rtol = 1e-5 if state_dtype == jnp.float32 else 2 ** -6  # two bfloat16 ulps
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=rtol)


def test_backward_kernel_keeping_the_lower_layers_gates(monkeypatch):
  """lstm_kernel.KEEP_LOWER_GATES: layer 0's gates kept from the recomputed forward
  pass rather than computed again: the same gradients."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(8), 2, (20, 20), lead=(90,))

  def grads():
    return jax.grad(lambda layers, x: jnp.sum(jnp.sin(cells.lstm_stack_apply(
        layers, x, states, readout, kernel="pallas_interpret", gradient_chunks=2)[0])),
        argnums=(0, 1))(layers, x)

  recomputed = grads()
  monkeypatch.setattr(lstm_kernel, "KEEP_LOWER_GATES", True)
  chex.assert_trees_all_close(grads(), recomputed, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("n_in,sizes", [(2, (20, 20)), (20, (20, 20))])
def test_kernels_looping_over_blocks_of_rows(monkeypatch, n_in, sizes):
  """lstm_kernel.BLOCKS_PER_PROGRAM and BACKWARD_BLOCKS_PER_PROGRAM: 210 rows as 2
  programs of 3 blocks of 64 (the last two blocks partly and wholly past the rows) in
  both kernels: XLA's outputs and gradients."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(9), n_in, sizes, lead=(210,))

  def grads(kernel):
    return jax.grad(lambda layers, x, states: jnp.sum(jnp.sin(cells.lstm_stack_apply(
        layers, x, states, readout, kernel=kernel, gradient_chunks=2)[0])),
        argnums=(0, 1, 2))(layers, x, states)

  monkeypatch.setattr(lstm_kernel, "BACKWARD_BLOCKS_PER_PROGRAM", 3)
  monkeypatch.setattr(lstm_kernel, "BACKWARD_NUM_STAGES", 2)
  monkeypatch.setattr(lstm_kernel, "BLOCKS_PER_PROGRAM", 3)  # the forward kernel's
  monkeypatch.setattr(lstm_kernel, "NUM_STAGES", 2)
  chex.assert_trees_all_close(grads("pallas_interpret"), grads("xla"), atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(
      cells.lstm_stack_apply(layers, x, states, readout, kernel="pallas_interpret"),
      cells.lstm_stack_apply(layers, x, states, readout), atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("n_in,sizes", [(2, (20, 20)), (20, (20, 20))])
def test_backward_kernel_on_other_blocks_of_rows(monkeypatch, n_in, sizes):
  """300 rows at the default lstm_kernel.BACKWARD_BLOCK_ROWS (128: three programs, the
  last one partly past the rows) and at 64 (five): XLA's gradients; then
  GRADIENT_BLOCK_ROWS = 128 (dm_grad_128)."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(10), n_in, sizes, lead=(300,))

  def grads(kernel):
    return jax.grad(lambda layers, x, states: jnp.sum(jnp.sin(cells.lstm_stack_apply(
        layers, x, states, readout, kernel=kernel, gradient_chunks=2)[0])),
        argnums=(0, 1, 2))(layers, x, states)

  want = grads("xla")
  assert lstm_kernel.BACKWARD_BLOCK_ROWS == 128
  chex.assert_trees_all_close(grads("pallas_interpret"), want, atol=1e-6, rtol=1e-5)
  monkeypatch.setattr(lstm_kernel, "BACKWARD_BLOCK_ROWS", 64)
  chex.assert_trees_all_close(grads("pallas_interpret"), want, atol=1e-6, rtol=1e-5)
  # the weights' gradient kernel's blocks too (dm_grad_128): each program's 150 rows as a
  # whole block and a partial one
  monkeypatch.setattr(lstm_kernel, "GRADIENT_BLOCK_ROWS", 128)
  monkeypatch.setattr(lstm_kernel, "GRADIENT_NUM_STAGES", 2)
  chex.assert_trees_all_close(grads("pallas_interpret"), want, atol=1e-6, rtol=1e-5)


def test_forward_kernel_writes_the_gates_for_xlas_backward_pass():
  """"pallas_forward": the forward kernel also writes each layer's gate tanh, the
  residual XLA's backward pass reads."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(6), 2, (20, 20), lead=(150,))
  stack = cells.lstm_stack_prepare(layers, readout, kernel="pallas_interpret")
  hs, cs = [s.h for s in states], [s.c for s in states]
  got = lstm_kernel.stack_forward(stack.layouts.padded, x, hs, cs, 1, interpret=True,
                                  with_gates=True)
  (out, new_hs, new_cs), ts = cells._xla_stack(stack.layouts, x, hs, cs)
  chex.assert_trees_all_close(got, (out, new_hs, new_cs, ts), atol=2e-6, rtol=2e-6)


def test_stack_is_prepared_once_per_transform():
  """The pre-scaled (and padded) weights are made in transform, not in every step."""
  lopt = models.dm(lstm_kernel="pallas_interpret")
  theta = lopt.init(jax.random.PRNGKey(0))
  prepare = lopt.prepare
  calls = []
  object.__setattr__(lopt, "prepare", lambda th: calls.append(1) or prepare(th))
  tx = lopt.transform(theta)
  params = {"w": jnp.ones((5, 3)), "b": jnp.zeros((3,))}
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(params, state, params)
  assert len(calls) == 1


@pytest.mark.parametrize("name", ["dm", "rnnprop"])
@pytest.mark.parametrize("forward_loop", [False, True])
def test_models_with_the_kernel_give_the_same_updates(name, forward_loop, monkeypatch):
  if forward_loop:  # 287 rows, 5 blocks: 2 programs of 3, from the gradient itself (L2O-DM)
    monkeypatch.setattr(lstm_kernel, "FORWARD_PROGRAMS_PER_CORE", 1)
    monkeypatch.setattr(lstm_kernel, "CORES_OFF_GPU", 2)
  theta = models.get(name).init(jax.random.PRNGKey(0))
  params = {"w": jax.random.normal(jax.random.PRNGKey(1), (40, 7)),
            "b": {"bias": jnp.zeros((7,))}}

  def updates(kernel):
    tx = models.get(name, lstm_kernel=kernel).transform(theta)
    state, out = tx.init(params), []
    for i in range(3):
      grads = jax.tree_util.tree_map(lambda p: jnp.cos(p + i), params)
      u, state = jax.jit(tx.update)(grads, state, params)
      out.append(u)
    return out

  chex.assert_trees_all_close(updates("pallas_interpret"), updates("xla"), atol=1e-7, rtol=1e-5)


def test_unknown_kernel_names_the_field():
  with pytest.raises(ValueError, match="lstm_kernel='cuda'"):
    models.dm(lstm_kernel="cuda")
  with pytest.raises(ValueError, match="kernel='tpu'"):
    cells.lstm_stack_prepare([cells.lstm_init(jax.random.PRNGKey(0), 2, 4)],
                             cells.linear_init(jax.random.PRNGKey(1), 4, 1), kernel="tpu")


@pytest.mark.parametrize("sizes", [(20, 20), (32,)], ids=["packed", "unpacked"])
def test_forward_kernel_preprocesses_the_gradient_itself(sizes):
  """``log_and_sign_k``: the kernel reads the gradient and computes log_and_sign in its
  lanes (beside h where it fits, in a tile of its own where it does not): the same
  outputs as from the preprocessed x, over gradients from 1e-12 to 10 and 0."""
  from l2ojax.models import preprocess
  layers, readout, _, states = _stack(jax.random.PRNGKey(3), 2, sizes, lead=(300,))
  stack = cells.lstm_stack_prepare(layers, readout, kernel="pallas_interpret")
  g = jnp.concatenate([jnp.logspace(-12, 1, 299) * jnp.where(jnp.arange(299) % 2, 1, -1),
                       jnp.zeros(1)])
  hs, cs = [s.h for s in states], [s.c for s in states]
  want = lstm_kernel.stack_forward(stack.layouts.padded, preprocess.log_and_sign(g, 5.0),
                                   hs, cs, 1, interpret=True)
  got = lstm_kernel.stack_forward(stack.layouts.padded, g, hs, cs, 1, interpret=True,
                                  log_and_sign_k=5.0)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match=r"gradient \(300,\) does not match x \(300, 3\)"):
    cells.lstm_stack_run(stack, jnp.zeros((300, 3)), states, (g, 5.0))


def test_kernel_lowers_for_gpu():
  """The kernel lowers to one Triton custom call (block shapes, dot tiles, masks)."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(4), 2, (20, 20), lead=(15910,))
  stack = cells.lstm_stack_prepare(layers, readout, kernel="pallas_interpret")

  def forward(padded, x, hs, cs):
    return lstm_kernel.stack_forward(padded, x, hs, cs, 1, interpret=False, with_gates=True)

  text = lower_for_cuda(jax.jit(forward), stack.layouts.padded, x, [s.h for s in states],
                         [s.c for s in states]).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1
  assert "lstm_stack_forward" in text


@pytest.mark.parametrize("name", ["dm", "rnnprop"])
def test_pallas_option_picks_the_kernel_only_for_cuda(name):
  """lstm_kernel="pallas": the kernel in a program lowered for CUDA, XLA's ops for the CPU."""
  theta = models.get(name).init(jax.random.PRNGKey(0))
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  run = jax.jit(lambda th: batch_rollout(models.get(name, lstm_kernel="pallas").transform(th),
                                         quadratic(dim=8), keys, 3))
  assert lower_for_cuda(run, theta).as_text().count("__gpu$xla.gpu.triton") == 1
  assert "triton" not in run.trace(theta).lower(lowering_platforms=("cpu",)).as_text()


@pytest.mark.parametrize("kernel,backward_kernels", [("pallas", 2), ("pallas_forward", 0)])
def test_differentiated_stack_lowers_its_backward_pass_to_kernels(kernel, backward_kernels):
  """A meta-gradient through the stack: "pallas" has a fused forward kernel and two
  backward ones (the cells', the weights' gradient) where lowered for CUDA,
  "pallas_forward" the forward one; none for the CPU."""
  theta = models.dm().init(jax.random.PRNGKey(0))
  keys = jax.random.split(jax.random.PRNGKey(1), 2)

  def loss(th):
    return jnp.sum(batch_rollout(models.dm(lstm_kernel=kernel).transform(th),
                                 quadratic(dim=8), keys, 3))

  meta_grad = jax.jit(jax.grad(loss))
  text = lower_for_cuda(meta_grad, theta).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1 + backward_kernels
  assert ("lstm_stack_backward" in text) == bool(backward_kernels)
  assert ("lstm_stack_weights_gradient" in text) == bool(backward_kernels)
  assert "triton" not in meta_grad.trace(theta).lower(lowering_platforms=("cpu",)).as_text()


def _loop_loss(layers, readout, x, states, kernel):
  """A loss of 3 steps of the stack over a batch of optimizees (vmap; x [batch, rows,
  n_in]), the weights' gradient in 4 partial sums per optimizee."""
  stack = cells.lstm_stack_prepare(layers, readout, kernel=kernel, gradient_chunks=4)

  def step(states, i):
    out, states = jax.vmap(lambda x, s: cells.lstm_stack_run(stack, x, s))(
        x * jnp.cos(i), states)
    return states, jnp.sum(jnp.sin(out))

  states_t, outs = jax.lax.scan(step, states, jnp.arange(3.0))
  return jnp.sum(outs) + sum(jnp.sum(s.c.astype(jnp.float32) ** 2) for s in states_t)


@pytest.mark.parametrize("state_dtype,rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2 ** -6)])
def test_backward_kernel_under_vmap_and_scan(state_dtype, rtol):
  """Interpreted: the meta-gradient of a loop of steps over a batch of optimizees,
  the gradient in 4 partial sums per optimizee, equals XLA's (with a bfloat16
  state, carried and saved in bfloat16, to its rounding)."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(5), 2, (20, 20), lead=(3, 50),
                                      state_dtype=state_dtype)
  grad = jax.jit(jax.grad(_loop_loss, argnums=(0, 1)), static_argnums=4)
  chex.assert_trees_all_close(grad(layers, readout, x, states, "pallas_interpret"),
                              grad(layers, readout, x, states, "xla"), atol=1e-5, rtol=rtol)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the kernel: needs a GPU")
@pytest.mark.parametrize("name,options,atol,constants", [
    ("dm", {}, 2e-2, {}), ("rnnprop", {}, 2e-2, {}),
    # both store the state rounded to bfloat16, in different orders of operations
    ("dm", {"state_dtype": "bfloat16"}, 5e-2, {}),
    # tanh.approx.f32 (relative error ~2^-11) in both kernels
    ("dm", {}, 5e-2, {"APPROX_TANH": 1}),
    # tanh from ex2.approx and rcp.approx (absolute error < 1e-6): the accurate tolerance;
    # also with the backward kernel keeping the lower layer's gates
    ("dm", {}, 2e-2, {"EXP2_TANH": 1}),
    ("dm", {}, 2e-2, {"EXP2_TANH": 1, "KEEP_LOWER_GATES": True}),
    # the forward kernel's programs reading the weights once for a loop over the blocks of
    # the 4 optimizees' folded rows (995 blocks, 3 programs per multiprocessor)
    ("dm", {}, 2e-2, {"FORWARD_PROGRAMS_PER_CORE": 3})],
    ids=["dm", "rnnprop", "dm_bf16_state", "dm_approx_tanh", "dm_exp2_tanh",
         "dm_exp2_tanh_keep_lower_gates", "dm_forward_loop"])
def test_fused_kernel_on_gpu(name, options, atol, constants, tiny_image_npz, monkeypatch):
  """Compiled on a GPU: the same loss curves as XLA's ops (both use TF32 products)."""
  for constant, value in constants.items():
    monkeypatch.setattr(lstm_kernel, constant, value)
  theta = models.get(name).init(jax.random.PRNGKey(0))
  mlp = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=16)
  keys = jax.random.split(jax.random.PRNGKey(1), 4)

  def lopt(kernel):
    return models.get(name, lstm_kernel=kernel, **options)

  curves = {k: batch_rollout(lopt(k).transform(theta), mlp, keys, 50) for k in ("xla", "pallas")}
  np.testing.assert_allclose(np.log(curves["pallas"]), np.log(curves["xla"]), atol=atol)
  # the meta-gradient through both fused kernels, as XLA's (TF32 products in both)
  meta = {k: jax.jit(jax.grad(lambda th: jnp.sum(jnp.log(batch_rollout(
      lopt(k).transform(th), mlp, keys, 20)))))(theta)
      for k in ("xla", "pallas")}
  for got, want in zip(jax.tree_util.tree_leaves(meta["pallas"]),
                       jax.tree_util.tree_leaves(meta["xla"])):
    np.testing.assert_allclose(got, want, atol=atol * float(jnp.max(jnp.abs(want))))
  lowered = jax.jit(lambda th: batch_rollout(lopt("pallas").transform(th), mlp, keys, 5)
                    ).lower(theta)
  assert "__gpu$xla.gpu.triton" in lowered.as_text()


def test_narrow_cotangents_round_only_the_weights_gradients_operands(monkeypatch):
  """Interpreted, lstm_kernel.NARROW_COTANGENTS: the weights' gradient from bfloat16
  gate cotangents and outputs is XLA's to bfloat16's rounding, averaged over the
  rows (a relative error of ~3e-4 of the largest entry here, not 0: they are
  rounded); the cotangents that flow on are float32's (the input's gradient as
  without it), and so is the read-out bias's gradient (the sum of d_out)."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(5), 2, (20, 20), lead=(3, 50))
  grad = lambda kernel: jax.jit(jax.grad(_loop_loss, argnums=(0, 1, 2)), static_argnums=4)(
      layers, readout, x, states, kernel)
  want, exact = grad("xla"), grad("pallas_interpret")
  monkeypatch.setattr(lstm_kernel, "NARROW_COTANGENTS", 1)
  got = grad("pallas_interpret")  # a new jit: traced with the constant set
  error = lambda g, w: float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w)))
  layers_errors = jax.tree_util.tree_leaves(jax.tree_util.tree_map(error, got[0], want[0]))
  assert 1e-5 < min(layers_errors) and max(layers_errors) < 2e-3, layers_errors
  assert error(got[1]["w"], want[1]["w"]) < 2e-3
  # the read-out's bias from d_out alone (float32): as without
  chex.assert_trees_all_close(got[1]["b"], exact[1]["b"], atol=0, rtol=0)
  chex.assert_trees_all_close(got[2], exact[2], atol=0, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the kernels: needs a GPU")
@pytest.mark.parametrize("name,options,narrow,tol,loop", [
    ("dm", {}, 0, 1e-4, 0), ("rnnprop", {}, 0, 1e-4, 0),
    ("dm", {"state_dtype": "bfloat16"}, 0, 1e-4, 0),
    # the weights' gradient's operands in bfloat16: their rounding, averaged over the rows
    ("dm", {}, 1, 3e-3, 0),
    # the forward kernel looping over the 3 optimizees' folded rows, each to its own tape
    ("dm", {}, 0, 1e-4, 2)],
    ids=["dm", "rnnprop", "dm_bf16_state", "dm_narrow_cotangents", "dm_forward_loop"])
def test_residual_tape_on_gpu(name, options, narrow, tol, loop, tiny_image_npz, monkeypatch):
  """Compiled on a GPU: a meta-step whose fused kernels write and read each step's
  saved inputs in a tape (residuals.taped_scan) gives the meta-step of the stacked
  residuals: the same optimizee trajectories and meta-loss (the same forward
  arithmetic) and meta-gradient (to float rounding: within ``tol`` of each
  matrix's largest entry; with NARROW_COTANGENTS, to bfloat16's rounding of the
  weights' gradient's operands)."""
  from l2ojax.meta import step as step_lib
  monkeypatch.setattr(lstm_kernel, "FORWARD_PROGRAMS_PER_CORE", loop)
  mlp = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=16)
  lopt = models.get(name, lstm_kernel="pallas", **options)
  theta = lopt.init(jax.random.PRNGKey(0))
  outs = []
  for tape in (False, True):
    monkeypatch.setattr(lstm_kernel, "NARROW_COTANGENTS", narrow if tape else 0)
    states = step_lib.make_init_states(lopt, 3)(theta, jax.random.PRNGKey(1), mlp)
    meta_step = step_lib.make_meta_step(lopt, optax.sgd(1.0), 10, remat=None,
                                        residual_tape=tape)
    new_theta, _, states, metrics = meta_step(theta, optax.sgd(1.0).init(theta), states,
                                              jax.random.PRNGKey(2), mlp)
    outs.append((jax.tree_util.tree_map(jnp.subtract, new_theta, theta), states.params,
                 metrics["meta_loss"]))
  chex.assert_trees_all_close(outs[1][1:], outs[0][1:], atol=1e-6, rtol=1e-5)
  for got, want in zip(jax.tree_util.tree_leaves(outs[1][0]),
                       jax.tree_util.tree_leaves(outs[0][0])):
    np.testing.assert_allclose(got, want, rtol=0,
                               atol=tol * float(jnp.max(jnp.abs(want))) + 1e-7)


def test_meta_step_with_the_kernels_and_remat():
  """The interpreted kernels inside a meta-step recomputed by jax.checkpoint in
  chunks of steps: the same meta-loss and meta-gradient (an SGD step of 1) as
  XLA's ops."""
  from l2ojax.meta import step as step_lib
  q = optimizees.get("quadratic", dim=6, num_instances=4)
  outs = {}
  for kernel in ("xla", "pallas_interpret"):
    lopt = models.dm(lstm_kernel=kernel)
    theta = lopt.init(jax.random.PRNGKey(0))
    states = step_lib.make_init_states(lopt, 2)(theta, jax.random.PRNGKey(1), q)
    meta_step = step_lib.make_meta_step(lopt, optax.sgd(1.0), 4, remat="update",
                                        remat_chunk=2)
    theta, _, _, metrics = meta_step(theta, optax.sgd(1.0).init(theta), states,
                                     jax.random.PRNGKey(2), q)
    outs[kernel] = (theta, metrics["meta_loss"])
  chex.assert_trees_all_close(outs["pallas_interpret"], outs["xla"], atol=1e-6, rtol=1e-5)


def test_a_jax_without_pallas_triton_is_named(monkeypatch):
  """jax deprecates Pallas's Triton backend: where it is gone, asking for the kernels
  says so and names the way out, rather than failing deep inside an import."""
  import jax.experimental.pallas as pallas
  monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)
  monkeypatch.delattr(pallas, "triton", raising=False)  # once imported, `from` finds it here
  layers, readout, x, states = _stack(jax.random.PRNGKey(0), 2, (20,), lead=(8,))
  with pytest.raises(ImportError, match=r"Pallas's Triton backend.*lstm_kernel='xla'"):
    cells.lstm_stack_apply(layers, x, states, readout, kernel="pallas_interpret")


def test_approx_tanh_where_the_backend_lacks_it_is_named(monkeypatch):
  """lstm_kernel.APPROX_TANH on a Pallas Triton backend without approx_tanh: an error
  naming the setting, not an AttributeError from inside the kernel; interpreted kernels
  never need it."""
  from jax.experimental.pallas import triton as plt
  monkeypatch.setattr(lstm_kernel, "APPROX_TANH", 1)
  assert lstm_kernel._tanh(interpret=False) is plt.approx_tanh
  assert lstm_kernel._tanh(interpret=True) is jnp.tanh
  monkeypatch.delattr(plt, "approx_tanh")
  with pytest.raises(ImportError, match=r"no approx_tanh; set lstm_kernel.APPROX_TANH = 0"):
    lstm_kernel._tanh(interpret=False)
  monkeypatch.setattr(lstm_kernel, "APPROX_TANH", 0)
  assert lstm_kernel._tanh(interpret=False) is jnp.tanh


def test_exp2_tanh_is_tanh_to_float32s_rounding():
  """EXP2_TANH's formulas in float32: lstm_kernel.exp2_tanh, 1 - 2 / (1 + 2^(2 log2(e)
  z)), is tanh to an absolute error below 3e-7 on a fine grid of [-50, 50] and at tiny
  arguments (where 1 - 2 r cancels: an absolute, not a relative, bound), exactly -1 and
  1 at -inf and inf (2^u = inf: r = 0), NaN at NaN; lstm_kernel.exp2_gate, 1 / (1 +
  2^(-2 log2(e) z)), is (1 + tanh(z)) / 2 to 2e-7, and to 1e-6 of itself where it is
  small (no cancellation: a closed gate stays accurate)."""
  z = np.concatenate([np.linspace(-50.0, 50.0, 400_001), np.geomspace(1e-30, 1.0, 2_000),
                      -np.geomspace(1e-30, 1.0, 2_000)]).astype(np.float32)
  exact = np.tanh(z.astype(np.float64))
  t = np.asarray(jax.jit(lstm_kernel.exp2_tanh)(z))
  error = np.abs(t.astype(np.float64) - exact)
  assert error.max() < 3e-7, (error.max(), z[error.argmax()])
  assert np.any(t != np.asarray(jnp.tanh(z)))  # a formula of its own, not jnp.tanh
  edges = np.asarray(lstm_kernel.exp2_tanh(jnp.array([-np.inf, np.inf, np.nan], jnp.float32)))
  np.testing.assert_array_equal(edges[:2], [-1.0, 1.0])
  assert np.isnan(edges[2])
  s = np.asarray(jax.jit(lstm_kernel.exp2_gate)(z)).astype(np.float64)
  exact_s = 1.0 / (1.0 + np.exp(-2.0 * z.astype(np.float64)))  # (1 + tanh(z)) / 2
  assert np.abs(s - exact_s).max() < 2e-7
  small = (exact_s < 1e-3) & (exact_s > 1e-30)
  assert small.sum() > 1000 and np.max(np.abs(s[small] / exact_s[small] - 1.0)) < 1e-6


def test_exp2_tanh_interpreted_kernels_give_xlas_meta_gradient(monkeypatch):
  """Interpreted with lstm_kernel.EXP2_TANH: both kernels take tanh from exp2_tanh, and
  the meta-gradient of a loop of steps is XLA's to float32's rounding (as with jnp.tanh),
  but not bit for bit the one of jnp.tanh (the formula is in use)."""
  layers, readout, x, states = _stack(jax.random.PRNGKey(5), 2, (20, 20), lead=(3, 50))
  grad = lambda kernel: jax.jit(jax.grad(_loop_loss, argnums=(0, 1)), static_argnums=4)(
      layers, readout, x, states, kernel)
  want, accurate = grad("xla"), grad("pallas_interpret")
  monkeypatch.setattr(lstm_kernel, "EXP2_TANH", 1)
  got = grad("pallas_interpret")  # a new jit: traced with the constant set
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)
  assert any(not np.array_equal(g, a) for g, a in zip(jax.tree_util.tree_leaves(got),
                                                      jax.tree_util.tree_leaves(accurate)))


def test_exp2_tanh_lowered_for_cuda_carries_its_ptx(monkeypatch):
  """Lowered for CUDA with lstm_kernel.EXP2_TANH: the forward and backward kernels carry
  the ex2.approx / rcp.approx assembly; without it, neither does. Both set at once: an
  error naming them."""
  lopt = models.dm(lstm_kernel="pallas")
  q = optimizees.get("quadratic", dim=8, num_instances=4)
  theta = lopt.init(jax.random.PRNGKey(0))
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  text = {}
  for on in (0, 1):
    monkeypatch.setattr(lstm_kernel, "EXP2_TANH", on)
    meta_grad = jax.jit(jax.grad(lambda th: jnp.sum(jnp.log(batch_rollout(  # traced anew
        lopt.transform(th), q, keys, 3)))))
    text[on] = lower_for_cuda(meta_grad, theta).as_text()
  assert "ex2.approx.ftz.f32" in text[1] and "rcp.approx.ftz.f32" in text[1]
  # tanh's 2 log2(e) and the gates' -2 log2(e)
  assert "0f4038AA3B" in text[1] and "0fC038AA3B" in text[1]
  assert "ex2.approx" not in text[0] and "rcp.approx" not in text[0]
  monkeypatch.setattr(lstm_kernel, "APPROX_TANH", 1)
  with pytest.raises(ValueError, match="APPROX_TANH and EXP2_TANH are both set"):
    lstm_kernel._tanh(interpret=False)


def test_exp2_tanh_where_the_backend_lacks_inline_assembly_is_named(monkeypatch):
  """lstm_kernel.EXP2_TANH on a Pallas Triton backend without elementwise_inline_asm:
  an error naming the setting when the kernel is built; interpreted kernels never need
  it."""
  from jax.experimental.pallas import triton as plt
  monkeypatch.setattr(lstm_kernel, "EXP2_TANH", 1)
  assert lstm_kernel._tanh(interpret=True) is lstm_kernel.exp2_tanh
  monkeypatch.delattr(plt, "elementwise_inline_asm")
  with pytest.raises(ImportError, match=r"no elementwise_inline_asm; set lstm_kernel.EXP2_TANH = 0"):
    lstm_kernel._tanh(interpret=False)(jnp.zeros((16, 16)))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiles the kernel: needs a GPU")
def test_exp2_tanh_on_gpu_is_tanh_to_1e6():
  """Compiled on a GPU: EXP2_TANH's assembly (ex2.approx, rcp.approx) in a Pallas kernel
  is tanh, and its gate (1 + tanh) / 2, to an absolute error below 1e-6 on a fine grid
  of [-20, 20]."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt
  z = jnp.linspace(-20.0, 20.0, 1 << 20, dtype=jnp.float32).reshape(1 << 13, 1 << 7)

  def kernel(z_ref, t_ref, s_ref):
    t_ref[...] = lstm_kernel._tanh(interpret=False)(z_ref[...])
    s_ref[...] = lstm_kernel._gate(interpret=False)(z_ref[...])

  block = pl.BlockSpec((32, 1 << 7), lambda i: (i, 0))  # 32 floats per thread per array
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(lstm_kernel, "EXP2_TANH", 1)
    t, s = pl.pallas_call(kernel, out_shape=[jax.ShapeDtypeStruct(z.shape, jnp.float32)] * 2,
                          grid=(z.shape[0] // 32,), in_specs=[block], out_specs=[block] * 2,
                          compiler_params=plt.CompilerParams(num_warps=4))(z)  # Triton's
  exact = np.tanh(np.asarray(z, np.float64))
  assert np.abs(np.asarray(t, np.float64) - exact).max() < 1e-6
  assert np.abs(np.asarray(s, np.float64) - (1.0 + exact) / 2).max() < 1e-6


def _block_times(batch, rows, cores, chunks):
  """Rounds of programs x blocks per program, counted the slow way."""
  programs = [len(range(c * -(-rows // chunks), min((c + 1) * -(-rows // chunks), rows)))
              for c in range(chunks)] * batch
  rounds = -(-len(programs) // cores)
  return rounds * -(-max(programs) // lstm_kernel.GRADIENT_BLOCK_ROWS)


@pytest.mark.parametrize("batch,want", [(1, 125), (8, 16), (64, 2), (256, 1)])
def test_backward_chunks_fill_the_gpu_with_the_fewest_partial_sums(batch, want):
  """L2O-DM on the MNIST MLP (15,910 coordinates), an H100's 132 multiprocessors."""
  rows, cores = 15_910, 132
  chunks = lstm_kernel.backward_chunks(batch, rows, cores)
  assert chunks == want
  best = min(_block_times(batch, rows, cores, c) for c in range(1, 600))
  assert _block_times(batch, rows, cores, chunks) <= 1.05 * best
  assert all(_block_times(batch, rows, cores, c) > 1.05 * best for c in range(1, chunks))
  if batch == 1:  # a fixed 64 would leave half the multiprocessors idle
    assert _block_times(1, rows, cores, 64) > 1.8 * best


def test_backward_chunks_count_the_programs_a_multiprocessor_runs_at_once(monkeypatch):
  rows, cores = 15_910, 132
  monkeypatch.setattr(lstm_kernel, "GRADIENT_PROGRAMS_PER_CORE", 2)
  for batch in (8, 64):  # twice the programs fit one round: twice the partial sums
    chunks = lstm_kernel.backward_chunks(batch, rows, cores)
    assert chunks == 2 * {8: 16, 64: 2}[batch]
    assert _block_times(batch, rows, 2 * cores, chunks) <= 1.05 * min(
        _block_times(batch, rows, 2 * cores, c) for c in range(1, 600))


def test_backward_chunks_of_few_rows_and_bad_input():
  assert lstm_kernel.backward_chunks(1, 10, 132) == 1
  with pytest.raises(ValueError, match="cores=0"):
    lstm_kernel.backward_chunks(1, 10, 0)


def test_gradient_chunks_chosen_only_for_the_fused_kernels_and_only_when_unset():
  assert cells.auto_gradient_chunks("pallas", 0, 1, 15_910, cores=132) == 125
  assert cells.auto_gradient_chunks("pallas", 8, 1, 15_910, cores=132) == 8
  assert cells.auto_gradient_chunks("xla", 0, 1, 15_910, cores=132) == 0
  if jax.default_backend() != "gpu":  # no multiprocessors to fill: the backend's default
    assert cells.auto_gradient_chunks("pallas", 0, 1, 15_910) == 0
  lopt = models.dm(lstm_kernel="pallas").for_meta_batch(1, 15_910)
  assert lopt.gradient_chunks == (0 if jax.default_backend() != "gpu" else lopt.gradient_chunks)
  assert models.rnnprop(gradient_chunks=3).for_meta_batch(64, 100).gradient_chunks == 3


@pytest.mark.parametrize("imitation", [False, True])
def test_meta_steps_size_the_learned_optimizer_for_their_batch(imitation):
  """Both meta-steps hand ``for_meta_batch`` the batch and each optimizee's
  coordinates, and differentiate what it returns (here: 3 partial sums instead
  of 1, the same meta-gradient)."""
  from l2ojax.meta import imitation as imitation_lib
  from l2ojax.meta import step as step_lib
  dm_cls = type(models.dm())
  seen = []

  class Tuned(dm_cls):
    def transform(self, theta):
      seen.append(("tuned", self.gradient_chunks))
      return super().transform(theta)

  class Recording(dm_cls):
    def for_meta_batch(self, batch_size, num_coordinates):
      seen.append((batch_size, num_coordinates))
      return Tuned(**dataclasses.asdict(self) | {"gradient_chunks": 3})

  q = optimizees.get("quadratic", dim=6, num_instances=4)
  thetas = []
  for lopt in (models.dm(), Recording()):
    theta = lopt.init(jax.random.PRNGKey(0))
    if imitation:
      teacher = imitation_lib.make_teacher()
      states = imitation_lib.make_init_imitation_states(lopt, teacher, 2)(
          theta, jax.random.PRNGKey(1), q)
      step = imitation_lib.make_imitation_step(lopt, teacher, optax.sgd(1.0), 4)
    else:
      states = step_lib.make_init_states(lopt, 2)(theta, jax.random.PRNGKey(1), q)
      step = step_lib.make_meta_step(lopt, optax.sgd(1.0), 4)
    thetas.append(step(theta, optax.sgd(1.0).init(theta), states, jax.random.PRNGKey(2), q)[0])
  assert seen == [(2, 6), ("tuned", 3)]
  chex.assert_trees_all_close(thetas[0], thetas[1], atol=1e-6, rtol=1e-5)


def test_imitation_step_with_the_kernels():
  """An imitation step (the learner fed the teacher's gradients, differentiated
  through the interpreted kernels): the same loss and theta as with XLA's ops."""
  from l2ojax.meta import imitation as imitation_lib
  q = optimizees.get("quadratic", dim=6, num_instances=4)
  teacher = imitation_lib.make_teacher()
  outs = {}
  for kernel in ("xla", "pallas_interpret"):
    lopt = models.dm(lstm_kernel=kernel, preprocessing="identity", scale=1.0)
    theta = lopt.init(jax.random.PRNGKey(0))
    states = imitation_lib.make_init_imitation_states(lopt, teacher, 2)(
        theta, jax.random.PRNGKey(1), q)
    step = imitation_lib.make_imitation_step(lopt, teacher, optax.sgd(1.0), 4)
    theta, _, _, metrics = step(theta, optax.sgd(1.0).init(theta), states,
                                jax.random.PRNGKey(2), q)
    outs[kernel] = (theta, metrics["imitation_loss"])
  assert float(outs["xla"][1]) > 0
  chex.assert_trees_all_close(outs["pallas_interpret"], outs["xla"], atol=1e-6, rtol=1e-5)
