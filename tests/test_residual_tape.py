"""A loop's residual tape (residuals.taped_scan): the fused LSTM kernels write each
step's saved inputs in place into one buffer for the segment and read them back in
place, with the values and meta-gradients of the stacked residuals."""
import importlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from l2ojax import models, optimizees
from l2ojax.meta import step as step_lib
from tests.helpers.lowering import lower_for_cuda

cells = importlib.import_module("l2ojax.models.cells")
lstm_kernel = importlib.import_module("l2ojax.models.lstm_kernel")
preprocess = importlib.import_module("l2ojax.models.preprocess")
residuals = importlib.import_module("l2ojax.models.residuals")


def _meta_step(name, kernel, residual_tape, state_dtype="", steps=4, batch=2, dim=6,
               **step_options):
  options = {"state_dtype": state_dtype} if state_dtype else {}
  lopt = models.get(name, lstm_kernel=kernel, **options)
  q = optimizees.get("quadratic", dim=dim, num_instances=4)
  theta = lopt.init(jax.random.PRNGKey(0))
  states = step_lib.make_init_states(lopt, batch)(theta, jax.random.PRNGKey(1), q)
  meta_step = step_lib.make_meta_step(lopt, optax.sgd(1.0), steps, remat=None,
                                      residual_tape=residual_tape, **step_options)
  theta, _, states, metrics = meta_step(theta, optax.sgd(1.0).init(theta), states,
                                        jax.random.PRNGKey(2), q)
  return theta, states, metrics["meta_loss"]


@pytest.mark.parametrize("name,kernel,state_dtype", [
    ("dm", "pallas_interpret", ""),          # the kernels' programs, interpreted
    ("dm", "pallas", ""),                    # off a GPU: XLA's ops write and read the tape
    ("dm", "pallas_interpret", "bfloat16"),  # a bfloat16 tape, x as [hi, lo]
    ("dm", "pallas", "bfloat16"),
    ("rnnprop", "pallas_interpret", ""),     # x beside h does not fit in the padding
])
def test_meta_step_with_a_residual_tape_is_the_meta_step(name, kernel, state_dtype, monkeypatch):
  """One SGD step of 1 on the meta-gradient: the same theta, states and meta-loss as
  XLA's ops with stacked residuals; and the tape was used, with the weights'
  gradient summed in the loop's carry."""
  recorded = []
  record = residuals.record

  def spy(*args, **kwargs):
    result = record(*args, **kwargs)
    recorded.append((result is not None, kwargs.get("accumulator") is not None))
    return result

  monkeypatch.setattr(residuals, "record", spy)
  got = _meta_step(name, kernel, True, state_dtype)
  assert (True, True) in recorded  # a tape, and the weights' gradient summed in the carry
  want = _meta_step(name, "xla", False, state_dtype)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name,dim,batch", [
    ("dm", 6, 2),        # 2 optimizees' 6 rows in one block of 64
    ("dm", 100, 3),      # 300 rows: 2 programs of 3 blocks, optimizees across blocks
    ("rnnprop", 100, 3)])
def test_a_residual_tape_with_the_optimizees_rows_folded(name, dim, batch, monkeypatch):
  """lstm_kernel.FORWARD_PROGRAMS_PER_CORE with a tape: the forward kernel runs on the
  batch's rows folded together, each optimizee's saved inputs in its own tape's slot
  (the backward kernels read them there): the stacked residuals' meta-step."""
  monkeypatch.setattr(lstm_kernel, "FORWARD_PROGRAMS_PER_CORE", 1)
  monkeypatch.setattr(lstm_kernel, "CORES_OFF_GPU", 2)
  calls = []
  stride = lstm_kernel.forward_stride
  monkeypatch.setattr(lstm_kernel, "forward_stride", lambda n, cores: calls.append(n) or
                      stride(n, cores))
  got = _meta_step(name, "pallas_interpret", True, steps=3, batch=batch, dim=dim)
  assert batch * dim in calls  # the forward kernel on the folded rows
  want = _meta_step(name, "xla", False, steps=3, batch=batch, dim=dim)
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("options", [{"scan_unroll": 3}, {"second_order": True}])
def test_a_residual_tape_in_an_unrolled_loop_and_second_order(options):
  """3 steps per loop iteration over 4 steps (a remainder), and a second-order
  meta-gradient: the stacked residuals' meta-step."""
  chex.assert_trees_all_close(_meta_step("dm", "pallas", True, **options),
                              _meta_step("dm", "xla", False, **options), atol=1e-6, rtol=1e-5)


def test_imitation_step_with_a_residual_tape_is_the_imitation_step():
  """The learner's steps of an imitation segment on a tape (interpreted kernels):
  the theta and imitation loss of XLA's ops with stacked residuals."""
  from l2ojax.meta import imitation
  q = optimizees.get("quadratic", dim=6, num_instances=4)
  teacher = imitation.make_teacher("adam", 0.01)
  outs = []
  for kernel, tape in (("xla", False), ("pallas_interpret", True)):
    lopt = models.dm(lstm_kernel=kernel)
    theta = lopt.init(jax.random.PRNGKey(0))
    states = imitation.make_init_imitation_states(lopt, teacher, 2)(
        theta, jax.random.PRNGKey(1), q)
    il_step = imitation.make_imitation_step(lopt, teacher, optax.sgd(1.0), 4,
                                            residual_tape=tape)
    theta, _, _, metrics = il_step(theta, optax.sgd(1.0).init(theta), states,
                                   jax.random.PRNGKey(2), q)
    outs.append((theta, metrics["imitation_loss"]))
  chex.assert_trees_all_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)


def test_the_backward_pass_reads_the_tape():
  """The tape reaches the backward pass as its cotangent: starting the backward loop
  with a zero tape instead changes the meta-gradient (nothing else holds the steps'
  inputs)."""
  want = _meta_step("dm", "pallas_interpret", True)[0]
  zero_tapes = lambda tapes, ct: (jax.tree_util.tree_map(jnp.zeros_like, tapes), ct)
  residuals._release.defvjp(residuals._release_fwd, zero_tapes)
  try:
    got = _meta_step("dm", "pallas_interpret", True)[0]
  finally:
    residuals._release.defvjp(residuals._release_fwd, residuals._release_bwd)
  assert not np.allclose(got["lstm_0"]["w"], want["lstm_0"]["w"], atol=1e-6)


def test_the_tape_replaces_the_stacked_residual_when_lowered_for_cuda():
  """Lowered for CUDA (B = 2 optimizees of 8 coordinates, 4 steps, 82 saved floats per
  row): the loop stacks no per-step residual [4, 2, 8, 82] and slices none out; the
  tape [2, 4 x 8, 82] is the only residual of that width, allocated uninitialized
  (no pass of zeros over it)."""
  lopt = models.dm(lstm_kernel="pallas")
  q = optimizees.get("quadratic", dim=8, num_instances=4)
  theta = lopt.init(jax.random.PRNGKey(0))
  states = step_lib.make_init_states(lopt, 2)(theta, jax.random.PRNGKey(1), q)
  widths = {}
  for tape in (False, True):
    meta_step = step_lib.make_meta_step(lopt, optax.sgd(1.0), 4, remat=None, residual_tape=tape)
    text = lower_for_cuda(meta_step, theta, optax.sgd(1.0).init(theta), states,
                          jax.random.PRNGKey(2), q).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3
    widths[tape] = set(re.findall(r"tensor<([\dx]*)x82xf32>", text))
    assert ("AllocateBuffer" in text) == tape
  assert "4x2x8" in widths[False]
  assert widths[True] == {"2x32"}


@pytest.mark.parametrize("state_dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_write_and_read_their_slot_of_a_tape(state_dtype):
  """Interpreted: the forward kernel writes the step's saved inputs (as
  cells._saved_inputs) into its slot's rows and no other; the backward kernels read
  from a tape's slot what they read from those inputs alone; the weights' gradient
  adds itself to a running sum."""
  n, sizes = 70, (20, 20)
  keys = jax.random.split(jax.random.PRNGKey(3), 8)
  layers = [cells.lstm_init(keys[i], i and 20 or 2, 20) for i in range(2)]
  stack = cells.lstm_stack_prepare(layers, cells.linear_init(keys[2], 20, 1),
                                   kernel="pallas_interpret")
  g = jax.random.normal(keys[3], (n,)) * 1e-3
  hs = [jax.random.normal(keys[4 + i], (n, 20)).astype(state_dtype) for i in range(2)]
  cs = [jax.random.normal(keys[6 + i], (n, 20)).astype(state_dtype) for i in range(2)]
  x = preprocess.log_and_sign(g, 10.0)
  saved = cells._saved_inputs(x, hs, cs)
  tape = jnp.full((3 * n, saved.shape[-1]), 7.0, saved.dtype)
  slot = jnp.array([1], jnp.int32)
  *outs, new_tape = lstm_kernel.stack_forward(stack.layouts.padded, g, hs, cs, 1,
                                              interpret=True, log_and_sign_k=10.0,
                                              tape=tape, slot=slot)
  chex.assert_trees_all_close(
      tuple(outs), lstm_kernel.stack_forward(stack.layouts.padded, g, hs, cs, 1, interpret=True,
                                      log_and_sign_k=10.0), atol=0, rtol=0)
  chex.assert_trees_all_close(new_tape[n:2 * n], saved, atol=1e-6, rtol=1e-6)
  assert np.all(np.asarray(new_tape[:n], np.float32) == 7.0)
  assert np.all(np.asarray(new_tape[2 * n:], np.float32) == 7.0)

  d_out = jax.random.normal(keys[0], (n, 1))
  dhs = [jax.random.normal(keys[1], (n, 20)).astype(state_dtype)] * 2
  backward = lambda saved, slot: lstm_kernel.stack_backward(
      stack.layouts.padded, saved, d_out, dhs, dhs, interpret=True, slot=slot)
  want, got = backward(new_tape[n:2 * n], None), backward(new_tape, slot)
  chex.assert_trees_all_close(got, want, atol=0, rtol=0)
  gradient = lambda saved, slot: lstm_kernel.weights_gradient(
      saved, want[4], want[3], d_out, 2, interpret=True, slot=slot)
  chex.assert_trees_all_close(gradient(new_tape, slot), gradient(new_tape[n:2 * n], None),
                              atol=0, rtol=0)
  # a loop's running sum of the gradient, added to in place
  running = jax.random.normal(keys[2], gradient(new_tape, slot).shape)
  chex.assert_trees_all_close(
      lstm_kernel.weights_gradient(new_tape, want[4], want[3], d_out, 2, interpret=True,
                                   slot=slot, add_to=running),
      running + gradient(new_tape, slot), atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="add_to"):
    lstm_kernel.weights_gradient(new_tape, want[4], want[3], d_out, 2, interpret=True,
                                 slot=slot, add_to=running[:1])


def test_a_tape_of_the_wrong_shape_is_named():
  stack = models.dm(lstm_kernel="pallas_interpret").prepare(
      models.dm().init(jax.random.PRNGKey(0)))
  hs = [jnp.zeros((10, 20))] * 2
  for tape, slot, what in [(jnp.zeros((25, 82)), jnp.array([0], jnp.int32), r"\[steps x 10"),
                           (jnp.zeros((20, 80)), jnp.array([0], jnp.int32), "82"),
                           (jnp.zeros((20, 82)), jnp.array(0, jnp.int32), "slot")]:
    with pytest.raises(ValueError, match=what):
      lstm_kernel.stack_forward(stack.layouts.padded, jnp.zeros(10), hs, hs, 1, interpret=True,
                                log_and_sign_k=10.0, tape=tape, slot=slot)


@pytest.mark.parametrize("options,field", [({"remat": "update"}, "remat"),
                                           ({"remat_chunk": 2}, "remat_chunk")])
def test_a_tape_with_recomputation_is_refused(options, field):
  """A recomputed update (or chunk of steps) would write its slots again."""
  with pytest.raises(ValueError, match=field):
    step_lib.make_meta_step(models.dm(lstm_kernel="pallas"), optax.sgd(1.0), 4,
                            residual_tape=True, **options)



def _recording_body(accumulator=None):
  def body(c, x):
    w = jnp.ones(3) * 2.0 if accumulator == "inside" else accumulator
    write = lambda tape, slot, acc: (c + x, tape, acc)
    recorded = residuals.record(3, 2, jnp.float32, write, accumulator=w)
    return (c + x if recorded is None else recorded), c
  return body


def test_every_call_of_a_taped_scan_finds_its_tapes():
  """The same body twice (a trace cached from the first call must not hide its
  records from the second): both loops keep their tape."""
  body = _recording_body()
  for _ in range(2):
    jaxpr = str(jax.make_jaxpr(lambda xs: residuals.taped_scan(body, jnp.zeros(3), xs))(
        jnp.ones((4, 3))))
    assert "f32[12,2]" in jaxpr  # the tape: 4 steps x 3 rows, 2 wide


def test_an_accumulator_made_inside_the_step_is_named():
  with pytest.raises(ValueError, match="accumulator of record call 0 is computed inside"):
    residuals.taped_scan(_recording_body("inside"), jnp.zeros(3), jnp.ones((4, 3)))


@pytest.mark.parametrize("name,options", [("scale", {}), ("dm", {"lstm_kernel": "xla"})])
def test_a_residual_tape_without_a_recording_kernel_is_the_plain_loop(name, options):
  """residual_tape with a learned optimizer that records nothing (L2O-Scale; L2O-DM on
  XLA's ops): the step traces once more to find that out, then runs the plain loop,
  with the same meta-step bit for bit."""
  lopt = models.get(name, **options)
  q = optimizees.get("quadratic", dim=6, num_instances=4)
  theta = lopt.init(jax.random.PRNGKey(0))
  outs = []
  for tape in (False, True):
    states = step_lib.make_init_states(lopt, 2)(theta, jax.random.PRNGKey(1), q)
    meta_step = step_lib.make_meta_step(lopt, optax.sgd(1e-3), 4, remat=None,
                                        meta_loss="log_ratio", residual_tape=tape)
    new_theta, _, _, metrics = meta_step(theta, optax.sgd(1e-3).init(theta), states,
                                         jax.random.PRNGKey(2), q)
    outs.append((new_theta, metrics["meta_loss"]))
  chex.assert_trees_all_equal(outs[0], outs[1])
