"""Smoke test of experiments/benchmark.py at tiny sizes: it runs and writes
valid JSON with the fields the report needs (not a timing test)."""
import importlib
import json
import re
import os
import subprocess
import sys

import jax
import pytest

from experiments import hugepages, kernel_constants

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def result(tiny_image_npz, tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  fake = tmp_path_factory.mktemp("no_torch")
  (fake / "torch.py").write_text("raise ImportError('torch hidden for this test')\n")
  # a persistent compilation cache in the environment must not serve the timed compiles
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), ROOT]),
             JAX_COMPILATION_CACHE_DIR=str(out / "compile_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  cmd = [sys.executable, "-m", "experiments.benchmark", "--models=dm,no_such_model",
         "--batch_sizes=2", "--segment=2", "--iters=2", "--warmup=1", "--rounds=2", "--w2_steps=3",
         "--w2_optimizees=2", "--w2_repeats=1", f"--data_path={tiny_image_npz}", f"--out={out}",
         f"--profile_dir={out / 'profile'}"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cache = out / "compile_cache"
  assert not cache.exists() or not os.listdir(cache), "timed compiles went through the cache"
  with open(out / "benchmark.json") as f:
    return json.load(f), proc.stdout, proc.stderr


def test_writes_w1_and_w2_rows(result):
  data, stdout, _ = result
  w1 = [r for r in data["rows"] if r["workload"] == "W1"]
  assert [(r["model"], r["B"]) for r in w1] == [("dm", 2)]
  for r in w1:  # two rounds of two timed iterations, from one compilation
    assert [len(run["seconds"]) for run in r["runs"]] == [2, 2]
    assert r["runs"][0]["compile_s"] == r["runs"][1]["compile_s"]
    assert r["steps_per_s"] == pytest.approx(r["B"] * 2 / r["median_s"])
    assert r["compile_s"] > 0 and r["compiled_bytes"] > 0
  w2 = {r["model"]: r for r in data["rows"] if r["workload"] == "W2"}
  assert set(w2) == {"adam", "dm"}
  assert w2["dm"]["ratio_vs_adam"] == pytest.approx(w2["dm"]["median_s"] / w2["adam"]["median_s"])
  assert "## W1" in stdout and "## W2" in stdout and "| dm | 2 |" in stdout


def test_profile_dir_traces_each_w1_row_once(result):
  data, _, _ = result
  w1 = [r for r in data["rows"] if r["workload"] == "W1" and "median_s" in r]
  assert w1 and all(r["kernel_times"] == [] for r in w1)  # no GPU plane on the CPU
  profile = data["flags"]["profile_dir"]
  for r in w1:  # one trace per row, after both timed rounds
    folder = os.path.join(profile, f"w1_{r['model']}_b{r['B']}")
    traces = [f for _, _, files in os.walk(folder) for f in files if f.endswith(".xplane.pb")]
    assert len(traces) == 1, traces


def test_reports_what_it_skipped_and_the_machine(result):
  data, stdout, _ = result
  notes = " ".join(data["notes"])
  assert "'no_such_model' skipped" in notes
  assert "torch is not importable" in notes and "torch is not importable" in stdout
  assert data["machine"]["backend"] == "cpu" and data["machine"]["commit"]
  assert data["data"].startswith("MNIST from")


def test_records_page_faults_and_the_huge_page_setting(result):
  data, stdout, _ = result
  w1 = [r for r in data["rows"] if r["workload"] == "W1"]
  assert all(r["minor_faults_per_iter"] >= 0 for r in w1)
  applies = hugepages.why_not(os.environ) is None or hugepages.tunable_set(os.environ)
  assert ("glibc.malloc.hugetlb" in data["machine"]["glibc_tunables"]) == applies
  assert "GLIBC_TUNABLES=" in stdout and "page faults/iter" in stdout


def test_counts_the_operations_of_each_optimizee_step(result, tiny_image_npz):
  data, stdout, _ = result
  w1 = [r for r in data["rows"] if r["workload"] == "W1"]
  assert all(r["loop_ops_per_step"] == sum(r["loop_ops"]) > 0 for r in w1)
  assert all(r["loop_ops_per_step"] > 0 for r in data["rows"] if r["workload"] == "W2")
  assert "loop ops/step" in stdout

  # the count sees what a change does to a step: a first-order meta-step (each
  # step's loss differentiated through the gradient it computed) runs fewer
  # operations per step than one that keeps d(grad)/d(params)
  import jax
  import optax
  from experiments import benchmark
  from l2ojax import models, optimizees
  from l2ojax.meta import step as step_lib
  mlp = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=16)
  lopt = models.dm()
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.adam(1e-3)
  states = step_lib.make_init_states(lopt, 2)(theta, jax.random.PRNGKey(1), mlp)

  def ops(second_order):
    meta_step = step_lib.make_meta_step(lopt, outer, 4, second_order=second_order)
    compiled = meta_step.lower(theta, outer.init(theta), states, jax.random.PRNGKey(2),
                               mlp).compile()
    return benchmark.loop_ops(compiled)

  first, second = ops(False), ops(True)
  assert len(first) == 2 and all(n > 0 for n in first)  # the forward and backward loops
  assert sum(first) < sum(second)


def test_loop_ops_by_kind_counts_per_loop_body(tiny_image_npz):
  """What experiments.gpu_kernels prints: one Counter per loop body holding a product
  (here of a program compiled for the CPU), summing to benchmark.loop_ops."""
  import optax
  from experiments import benchmark
  from l2ojax import models, optimizees
  from l2ojax.meta import step as step_lib
  mlp = optimizees.get("mnist_mlp", path=tiny_image_npz, batch_size=16)
  lopt = models.dm()
  theta = lopt.init(jax.random.PRNGKey(0))
  outer = optax.adam(1e-3)
  states = step_lib.make_init_states(lopt, 2)(theta, jax.random.PRNGKey(1), mlp)
  meta_step = step_lib.make_meta_step(lopt, outer, 4)
  compiled = meta_step.lower(theta, outer.init(theta), states, jax.random.PRNGKey(2),
                             mlp).compile()
  found = benchmark.loop_ops_by_kind(compiled.as_text())
  assert [sum(c.values()) for c in found] == benchmark.loop_ops(compiled)
  assert len(found) == 2 and all(sum(c.values()) > 0 for c in found)
  assert all(not set(c) & benchmark._BOOKKEEPING for c in found)
  assert all("fusion" in c for c in found)


def test_loop_bytes_counts_the_slices_a_step_reads_and_writes_not_whole_buffers():
  """benchmark.loop_bytes (gpu_kernels' traffic per step): a scan step reads its
  slice of the stacked inputs and writes its slot of the stacked outputs; the
  whole [T, ...] buffers are not traffic of every step."""
  import jax.numpy as jnp
  from experiments import benchmark
  n, length, width = 4096, 16, 8
  slice_bytes = n * width * 4

  def run(w, h, xs):
    def body(h, x):
      h = jnp.tanh(h @ w + x)
      return h, h
    return jax.lax.scan(body, h, xs)

  args = (jnp.ones((width, width)), jnp.ones((n, width)), jnp.ones((length, n, width)))
  traffic = benchmark.loop_bytes(jax.jit(run).lower(*args).compile().as_text())
  assert len(traffic) == 1
  # read x_t and h, write h and the output slot: about 4 slices, at most 8
  assert 3 * slice_bytes <= traffic[0] <= 8 * slice_bytes
  assert traffic[0] < length * slice_bytes / 2


_ASYNC_SLICE_LOOP = """
%fused_slice (param_0: f32[20,100,8], param_1: s32[]) -> f32[1,100,8] {
  %param_0 = f32[20,100,8]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %zero = s32[] constant(0)
  ROOT %dynamic-slice = f32[1,100,8]{2,1,0} dynamic-slice(%param_0, %param_1, %zero, %zero), dynamic_slice_sizes={1,100,8}
}

%body (p: (f32[20,100,8], s32[], f32[8,8])) -> (f32[20,100,8], s32[], f32[8,8]) {
  %p = (f32[20,100,8]{2,1,0}, s32[], f32[8,8]{1,0}) parameter(0)
  %stacked = f32[20,100,8]{2,1,0} get-tuple-element(%p), index=0
  %i = s32[] get-tuple-element(%p), index=1
  %w = f32[8,8]{1,0} get-tuple-element(%p), index=2
  %fusion-start = ((f32[20,100,8]{2,1,0}, s32[]), f32[1,100,8]{2,1,0}, u32[]) fusion-start(%stacked, %i), kind=kLoop, calls=%fused_slice
  %fusion-done = f32[1,100,8]{2,1,0} fusion-done(%fusion-start)
  %bitcast = f32[100,8]{1,0} bitcast(%fusion-done)
  %dot = f32[100,8]{1,0} dot(%bitcast, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tuple = (f32[20,100,8]{2,1,0}, s32[], f32[8,8]{1,0}) tuple(%stacked, %i, %w)
}

ENTRY %main (a: (f32[20,100,8], s32[], f32[8,8])) -> (f32[20,100,8], s32[], f32[8,8]) {
  %a = (f32[20,100,8]{2,1,0}, s32[], f32[8,8]{1,0}) parameter(0)
  ROOT %while = (f32[20,100,8]{2,1,0}, s32[], f32[8,8]{1,0}) while(%a), condition=%cond, body=%body
}
"""


def test_loop_bytes_and_kernels_of_an_asynchronous_fusion():
  """XLA may run a step's slice of the stacked residuals as fusion-start ... fusion-done:
  one kernel that moves the slice, not the whole [T, ...] buffer."""
  from experiments import benchmark
  slice_bytes = 100 * 8 * 4
  dot_bytes = 2 * slice_bytes + 8 * 8 * 4
  index_bytes = 4
  assert benchmark.loop_bytes(_ASYNC_SLICE_LOOP) == [2 * slice_bytes + index_bytes + dot_bytes]
  assert benchmark.loop_ops_by_kind(_ASYNC_SLICE_LOOP) == [{"fusion-start": 1, "dot": 1}]


_GATHER_LOOP = """
%body (p: (u8[10000,784], s32[10000], s32[4,128], f32[8,8])) -> (u8[10000,784], s32[10000], s32[4,128], f32[8,8]) {
  %p = (u8[10000,784]{1,0}, s32[10000]{0}, s32[4,128]{1,0}, f32[8,8]{1,0}) parameter(0)
  %images = u8[10000,784]{1,0} get-tuple-element(%p), index=0
  %labels = s32[10000]{0} get-tuple-element(%p), index=1
  %idx = s32[4,128]{1,0} get-tuple-element(%p), index=2
  %w = f32[8,8]{1,0} get-tuple-element(%p), index=3
  %call = (f32[4]{0}, f32[4,8,8]{2,1,0}) custom-call(%images, %labels, %idx, %w), custom_call_target="__gpu$xla.gpu.triton", backend_config={grid_x = 4 : i32, ir = "...", name = "KERNEL", num_warps = 4 : i32}
  %dot = f32[8,8]{1,0} dot(%w, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %tuple = (u8[10000,784]{1,0}, s32[10000]{0}, s32[4,128]{1,0}, f32[8,8]{1,0}) tuple(%images, %labels, %idx, %w)
}

ENTRY %main (a: (u8[10000,784], s32[10000], s32[4,128], f32[8,8])) -> (u8[10000,784], s32[10000], s32[4,128], f32[8,8]) {
  %a = (u8[10000,784]{1,0}, s32[10000]{0}, s32[4,128]{1,0}, f32[8,8]{1,0}) parameter(0)
  ROOT %while = (u8[10000,784]{1,0}, s32[10000]{0}, s32[4,128]{1,0}, f32[8,8]{1,0}) while(%a), condition=%cond, body=%body
}
"""


def test_loop_bytes_of_a_kernel_that_gathers_rows_of_a_table():
  """The fused MLP kernel reads only its minibatches' rows of the image table (4
  programs x 128 of 10,000 rows): not the whole table every step. Another
  custom call with the same operands reads them in full."""
  from experiments import benchmark
  rest = 4 * 128 * 4 + 8 * 8 * 4 + 4 * 4 + 4 * 8 * 8 * 4  # idx, w, outputs
  dot_bytes = 3 * 8 * 8 * 4
  gathered = 4 * 128 * (784 + 4)
  assert benchmark.loop_bytes(_GATHER_LOOP.replace("KERNEL", "mlp_value_and_grad")) == [
      gathered + rest + dot_bytes]
  assert benchmark.loop_bytes(_GATHER_LOOP.replace("KERNEL", "other_kernel")) == [
      10000 * (784 + 4) + rest + dot_bytes]


_TAPE_LOOP = """
%body (p: (f32[2,8], f32[2,8,20], s32[1], f32[2,40,82])) -> (f32[2,8], f32[2,8,20], s32[1], f32[2,40,82]) {
  %p = (f32[2,8]{1,0}, f32[2,8,20]{2,1,0}, s32[1]{0}, f32[2,40,82]{2,1,0}) parameter(0)
  %g = f32[2,8]{1,0} get-tuple-element(%p), index=0
  %h = f32[2,8,20]{2,1,0} get-tuple-element(%p), index=1
  %slot = s32[1]{0} get-tuple-element(%p), index=2
  %tape = f32[2,40,82]{2,1,0} get-tuple-element(%p), index=3
  %fwd = (f32[2,8,1]{2,1,0}, f32[2,8,20]{2,1,0}, f32[2,40,82]{2,1,0}) custom-call(%g, %h, %slot, %tape), custom_call_target="__gpu$xla.gpu.triton", backend_config={grid_x = 1 : i32, ir = "...", name = "lstm_stack_forward", num_warps = 4 : i32}
  %out = f32[2,8,1]{2,1,0} get-tuple-element(%fwd), index=0
  %bwd = f32[2,8,2]{2,1,0} custom-call(%tape, %out, %slot), custom_call_target="__gpu$xla.gpu.triton", backend_config={grid_x = 1 : i32, ir = "...", name = "lstm_stack_backward", num_warps = 8 : i32}
  %dot = f32[8,8]{1,0} dot(%g, %g), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  ROOT %tuple = (f32[2,8]{1,0}, f32[2,8,20]{2,1,0}, s32[1]{0}, f32[2,40,82]{2,1,0}) tuple(%g, %h, %slot, %tape)
}

ENTRY %main (a: (f32[2,8], f32[2,8,20], s32[1], f32[2,40,82])) -> (f32[2,8], f32[2,8,20], s32[1], f32[2,40,82]) {
  %a = (f32[2,8]{1,0}, f32[2,8,20]{2,1,0}, s32[1]{0}, f32[2,40,82]{2,1,0}) parameter(0)
  ROOT %while = (f32[2,8]{1,0}, f32[2,8,20]{2,1,0}, s32[1]{0}, f32[2,40,82]{2,1,0}) while(%a), condition=%cond, body=%body
}
"""


def test_loop_bytes_of_kernels_that_write_and_read_a_slot_of_a_tape():
  """With a slot operand, the fused LSTM kernels move only the slot's rows of the
  residual tape (8 rows of 5 x 8 per optimizee): the forward kernel writes them
  (nothing read), the backward kernel reads them. Without a slot (no int32 [1]
  operand), a tape-shaped operand counts in full."""
  from experiments import benchmark
  slot_rows, tape = 2 * 8 * 82 * 4, 2 * 40 * 82 * 4
  forward = (2 * 8 + 2 * 8 * 20 + 1) * 4 + (2 * 8 + 2 * 8 * 20) * 4 + slot_rows
  backward = slot_rows + (2 * 8 + 1) * 4 + 2 * 8 * 2 * 4
  dot_bytes = 2 * 2 * 8 * 4 + 8 * 8 * 4
  assert benchmark.loop_bytes(_TAPE_LOOP) == [forward + backward + dot_bytes]
  untaped = _TAPE_LOOP.replace("s32[1]", "s32[3]")
  # the tape read and written in full by the forward kernel, read in full by the backward
  assert benchmark.loop_bytes(untaped) == [forward + backward + dot_bytes
                                           + 3 * tape - 2 * slot_rows + 2 * 2 * 4]


def test_device_kernel_times_sums_each_kernel_on_the_gpu_streams_only():
  from experiments import benchmark
  plane = '''planes {{ id: {id} name: "{name}"
    lines {{ id: 1 name: "Stream #13(Compute)"
      events {{ metadata_id: 1 offset_ps: 0 duration_ps: 5000000 }}
      events {{ metadata_id: 2 offset_ps: 6000000 duration_ps: 1000000 }}
      events {{ metadata_id: 1 offset_ps: 8000000 duration_ps: 3000000 }} }}
    lines {{ id: 2 name: "XLA Ops" events {{ metadata_id: 1 offset_ps: 0 duration_ps: 5000000 }} }}
    event_metadata {{ key: 1 value {{ id: 1 name: "lstm_stack_backward" }} }}
    event_metadata {{ key: 2 value {{ id: 2 name: "gemm_fusion" }} }} }}
  '''
  gpu = plane.format(id=1, name="/device:GPU:0")
  host = plane.format(id=2, name="/host:CPU")
  times = benchmark.device_kernel_times(jax.profiler.ProfileData.from_text_proto(gpu + host))
  assert times == [
      {"kernel": "lstm_stack_backward", "count": 2, "total_us": 8.0, "mean_us": 4.0},
      {"kernel": "gemm_fusion", "count": 1, "total_us": 1.0, "mean_us": 1.0}]
  assert benchmark.device_kernel_times(jax.profiler.ProfileData.from_text_proto(host)) == []
  assert len(benchmark.device_kernel_times(jax.profiler.ProfileData.from_text_proto(gpu),
                                           top=1)) == 1


def test_kernel_constants_set_the_fused_kernels_tunables_and_name_bad_ones(monkeypatch):
  """--kernel_constant: an int or bool tunable of lstm_kernel, mlp_kernel, mlp or products, set before
  tracing; anything else is refused with the setting named."""
  from l2ojax import products
  from l2ojax.models import lstm_kernel
  from l2ojax.optimizees import mlp_kernel
  mlp = importlib.import_module("l2ojax.optimizees.mlp")
  for module, name in ((lstm_kernel, "BLOCK_ROWS"), (lstm_kernel, "KEEP_LOWER_GATES"),
                       (mlp_kernel, "CHUNKS_PER_PROGRAM"), (mlp, "BIAS_IN_PRODUCT"),
                       (products, "SMALL_ROWS")):
    monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
  done = kernel_constants.set_kernel_constants(
      ["lstm_kernel.BLOCK_ROWS=128", "lstm_kernel.KEEP_LOWER_GATES=true",
       " mlp_kernel.CHUNKS_PER_PROGRAM=2", "mlp.BIAS_IN_PRODUCT=1", "products.SMALL_ROWS=100"])
  assert done == {"lstm_kernel.BLOCK_ROWS": 128, "lstm_kernel.KEEP_LOWER_GATES": True,
                  "mlp_kernel.CHUNKS_PER_PROGRAM": 2, "mlp.BIAS_IN_PRODUCT": True,
                  "products.SMALL_ROWS": 100}
  assert (lstm_kernel.BLOCK_ROWS, lstm_kernel.KEEP_LOWER_GATES,
          mlp_kernel.CHUNKS_PER_PROGRAM, mlp.BIAS_IN_PRODUCT) == (128, True, 2, True)
  for bad in ("lstm_kernel.block_rows=64", "lstm_kernel.NO_SUCH=1", "scale.SEED=2",
              "lstm_kernel.BLOCK_ROWS=0", "lstm_kernel.BLOCK_ROWS=true",
              "lstm_kernel.KEEP_LOWER_GATES=5", "lstm_kernel.BLOCK_ROWS"):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
      kernel_constants.set_kernel_constants([bad])
  assert lstm_kernel.BLOCK_ROWS == 128


def test_sass_counts_per_thread_and_per_row(monkeypatch):
  """gpu_kernels --ptxas's SASS line: instructions by opcode (predicated ones too; the
  second line of each encoding and the NOP padding not), per row of a one-pass kernel
  from its rows and warps per program, and no per-row figure for a kernel that loops."""
  from experiments import gpu_kernels
  from l2ojax.models import lstm_kernel
  sass = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                          /* 0x000fe20000000f00 */
        /*0010*/               @P0 LDG.E.64 R20, desc[UR12][R214.64] ;  /* 0x0000000cd6140981 */
        /*0020*/              @!P1 MUFU.EX2 R2, R3 ;                    /* 0x0000000300027308 */
        /*0030*/                   MUFU.RCP R2, R2 ;                    /* 0x0000000200027308 */
        /*0040*/                   HGMMA.64x32x8.F32.TF32 gdesc[UR4], RZ, !UPT ;  /* 0x00e0 */
        /*0050*/                   EXIT ;                               /* 0x000000000000794d */
        /*0060*/                   BRA 0x60;                            /* 0xfffffffc00fc7947 */
        /*0070*/                   NOP;                                 /* 0x0000000000007918 */
  """
  assert gpu_kernels.sass_counts(sass) == {"LDC": 1, "LDG": 1, "MUFU": 2, "HGMMA": 1,
                                           "EXIT": 1, "BRA": 1}
  monkeypatch.setattr(lstm_kernel, "BACKWARD_BLOCK_ROWS", 64)
  monkeypatch.setattr(lstm_kernel, "BACKWARD_NUM_WARPS", 8)  # 4 threads per row
  line = gpu_kernels.sass_line("lstm_stack_backward", sass, top=2)
  assert line == "SASS lstm_stack_backward: 7 instructions per thread, 28 per row; MUFU 2, LDC 1"
  monkeypatch.setattr(lstm_kernel, "BACKWARD_NUM_WARPS", 4)
  assert ", 14 per row;" in gpu_kernels.sass_line("lstm_stack_backward", sass)
  assert gpu_kernels.rows_per_thread("lstm_stack_weights_gradient") is None
  assert "(its loops' bodies counted once)" in gpu_kernels.sass_line(
      "lstm_stack_weights_gradient", sass)
  # the forward kernel looping over blocks (FORWARD_PROGRAMS_PER_CORE): its loop's body,
  # from the backward branch's target (0x10) to the branch (0x30)
  monkeypatch.setattr(lstm_kernel, "FORWARD_PROGRAMS_PER_CORE", 3)
  assert gpu_kernels.rows_per_thread("lstm_stack_forward") is None
  looped = sass.replace("MUFU.RCP R2, R2 ;", "BRA 0x10 ;")
  assert gpu_kernels.loop_body(sass) == 0 and gpu_kernels.loop_body(looped) == 3
  assert "counted once; the longest loop's body 3)" in gpu_kernels.sass_line(
      "lstm_stack_forward", looped)
