r"""Kernels per optimizee step of W1 and W2 as compiled for a GPU, without a GPU.

At small B a GPU meta-step is bound by how many kernels each optimizee step
launches (BENCHMARKS.md), and XLA decides that number when it compiles. This
script compiles the benchmark's workloads for an NVIDIA H100 with XLA's GPU
compiler on any machine (deviceless ahead-of-time compilation; Triton and
ptxas run, so a Pallas kernel that would not compile fails here too) and
prints the kernels of each loop body per optimizee step, by kind, and the
bytes they read and write (``benchmark.loop_bytes``: what bounds a step at
large B, where nothing stays in the caches). It needs
the CUDA plugin of the installed jax, not a GPU:

  pip install "jax[cuda13]==$(python -c 'import jax; print(jax.__version__)')"
  python -m experiments.gpu_kernels --models=dm,rnnprop --lstm_kernel=pallas
  python -m experiments.gpu_kernels --workloads=w2 --dump=/tmp/w2_dm.txt
  python -m experiments.gpu_kernels --models=dm --batch_sizes=1 --lstm_kernel=pallas --ptxas

``--ptxas`` also assembles the fused kernels' PTX (sm_90a) and prints their
registers and spills per thread: what decides a Triton kernel's tiling
before it can be timed; with cuobjdump and nvdisasm
(``pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm``) also each
kernel's SASS instructions per thread and per row of the optimizee, by
opcode: what a kernel issues, whatever it waits on.
``--kernel_constant=lstm_kernel.BLOCK_ROWS=128`` (the benchmark's flag)
compiles another tiling.

Autotuning is off (no device to time candidates on), so a GEMM may be
tiled differently than on the device; the counts match the device's within
a few per step (L2O-DM, B = 1: 43 + 41 here, 43 + 39 in an H200's dump).
"""
from __future__ import annotations

import os

# Where XLA writes each kernel's PTX for --ptxas (set before jax is imported).
PTX_DIR = "/tmp/l2ojax_gpu_kernels_ptx"

if __name__ == "__main__":  # before jax is imported: compile for CUDA from the CPU client
  import shutil
  import sys
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  os.environ.setdefault("XLA_FLAGS", "--xla_gpu_autotune_level=0")
  if any(a == "--ptxas" or a.lower() in ("--ptxas=true", "--ptxas=1") for a in sys.argv):
    shutil.rmtree(PTX_DIR, ignore_errors=True)
    os.environ["XLA_FLAGS"] += f" --xla_dump_to={PTX_DIR}"

import collections  # noqa: E402
import contextlib  # noqa: E402
import glob  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Optional, Tuple  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import benchmark, kernel_constants  # noqa: E402
from l2ojax import optimizees  # noqa: E402
from l2ojax.models import cells, lstm_kernel  # noqa: E402
from l2ojax.meta import step as step_lib  # noqa: E402
from l2ojax.meta.unroll import batch_rollout  # noqa: E402

_WORKLOADS = flags.DEFINE_list("gpu_workloads", ["w1", "w2"], "Workloads to compile.")
_DUMP = flags.DEFINE_string("dump", "", "Write the last compiled program's text here.")
_PTXAS = flags.DEFINE_bool("ptxas", False, "Also assemble each fused Pallas kernel's PTX with "
                           "the plugin's ptxas and print its registers and spills per thread.")

# An H100 SXM as XLA's GPU compiler sees it (xla/stream_executor device description).
H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 13 minor: 0 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
H100_CORES = int(re.search(r"core_count: (\d+)", H100).group(1))

def cuda_sharding() -> jax.sharding.NamedSharding:
  from jax.experimental import topologies
  try:
    topology = topologies.get_topology_desc(platform="cuda", target_config=H100,
                                            topology="1x1x1")
  except Exception as e:  # no plugin: say how to get it
    raise SystemExit(f"gpu_kernels: cannot describe a CUDA device ({e}).\n  pip install "
                     f"\"jax[cuda13]=={jax.__version__}\"  (the plugin, no GPU needed)") from e
  mesh = topologies.make_mesh(topology, (1,), ("d",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _target_device(sharding: jax.sharding.NamedSharding):
  """A context naming the target GPU to what lowers for it without one: jax >= 0.11's
  Pallas Triton lowering asks the abstract mesh for the device kind."""
  abstract = getattr(sharding.mesh, "abstract_mesh", None)
  if abstract is None or getattr(abstract, "abstract_device", None) is None:
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(abstract)


def compile_program(fn, *args) -> Tuple[str, Optional[int], float]:
  """(program text, compiled memory in bytes: ``benchmark.compiled_bytes``, seconds to
  lower and compile) of ``fn`` compiled for the target GPU."""
  sharding = cuda_sharding()
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding), args)
  start = time.perf_counter()
  with _target_device(sharding):
    lowered = jax.jit(fn).lower(*abstract)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  text = compiled.as_text()
  if _DUMP.value:
    with open(_DUMP.value, "w") as f:
      f.write(text)
  return text, benchmark.compiled_bytes(compiled), seconds


def report(label: str, program: Tuple[str, Optional[int], float],
           steps_per_iteration: int) -> None:
  text, memory, seconds = program
  bodies = benchmark.loop_ops_by_kind(text)
  if not bodies:  # e.g. --unroll equal to the segment: XLA drops the one-trip loop
    print(f"{label}: no loop of optimizee steps in the compiled program (unrolled fully?); "
          + (f"compiled memory {memory / 2**30:.2f} GiB; " if memory else "")
          + f"lowered and compiled in {seconds:.1f} s", flush=True)
    return
  total = sum(sum(c.values()) for c in bodies) / steps_per_iteration
  parts = " + ".join(f"{sum(c.values())} ({', '.join(f'{k} {v}' for k, v in sorted(c.items()))})"
                     for c in bodies)
  traffic = [b / steps_per_iteration / 1e6 for b in benchmark.loop_bytes(text)]
  print(f"{label}: {total:g} kernels per optimizee step = {parts}; "
        f"{sum(traffic):.1f} MB moved per step = {' + '.join(f'{t:.1f}' for t in traffic)}"
        + (f"; compiled memory {memory / 2**30:.2f} GiB" if memory else "")
        + f"; lowered and compiled in {seconds:.1f} s", flush=True)


def main(argv):
  del argv
  constants = kernel_constants.set_kernel_constants(benchmark._KERNEL_CONSTANTS.value)
  if constants:
    print(f"kernel constants: {constants}")
  optimizee = optimizees.get("mnist_mlp", path=benchmark.random_mnist_npz("/tmp", n=1000),
                             kernel=benchmark._OPTIMIZEE_KERNEL.value)
  unroll = benchmark._UNROLL.value
  names = [m for m in benchmark._MODELS.value]
  # The default backend here is the CPU: resolve "0 = the meta-step's choice, else the
  # backend's default" as on the GPU target.
  coordinates = sum(int(np.prod(np.shape(p)))
                    for p in jax.tree_util.tree_leaves(optimizee.init(jax.random.PRNGKey(0))[0]))
  chunks_for = lambda b: (cells.auto_gradient_chunks(benchmark._LSTM_KERNEL.value,
                                                     benchmark._GRADIENT_CHUNKS.value, b,
                                                     coordinates, cores=H100_CORES)
                          or cells.GRADIENT_CHUNKS)
  print(f"jax {jax.__version__}, target {H100.split('device_description_str: ')[1].strip()}, "
        f"lstm_kernel={benchmark._LSTM_KERNEL.value}, gradient_chunks="
        f"{benchmark._GRADIENT_CHUNKS.value or 'auto'}, unroll={unroll}, "
        f"optimizee_kernel={benchmark._OPTIMIZEE_KERNEL.value}"
        + (", residual_tape" if benchmark._RESIDUAL_TAPE.value else ""), flush=True)
  if "w1" in _WORKLOADS.value:
    for model in names:
      for b in [int(x) for x in benchmark._BATCH_SIZES.value]:
        lopt = benchmark.learned_optimizer(model, chunks_for(b))
        outer = optax.adam(1e-3)
        theta = lopt.init(jax.random.PRNGKey(0))
        remat = None if benchmark._REMAT.value in ("auto", "none") else benchmark._REMAT.value
        states = step_lib.make_init_states(lopt, b)(theta, jax.random.PRNGKey(1), optimizee)
        meta_step = step_lib.make_meta_step(lopt, outer, benchmark._SEGMENT.value,
                                            meta_loss="mean", remat=remat,
                                            remat_chunk=benchmark.remat_chunk_for(b),
                                            scan_unroll=unroll,
                                            residual_tape=benchmark._RESIDUAL_TAPE.value)
        program = compile_program(meta_step, theta, outer.init(theta), states,
                                  jax.random.PRNGKey(2), optimizee)
        label = f"W1 {model} B={b}" + (f" ({lopt.gradient_chunks} partial sums)"
                                        if hasattr(lopt, "gradient_chunks") else "")
        report(label, program, unroll)
  if "w2" in _WORKLOADS.value:
    keys = jax.random.split(jax.random.PRNGKey(1), benchmark._W2_OPTIMIZEES.value)
    program = compile_program(
        lambda ks, o: batch_rollout(optax.adam(1e-3), o, ks, 100, unroll), keys, optimizee)
    report("W2 adam", program, unroll)
    for model in names:
      lopt = benchmark.learned_optimizer(model, cells.GRADIENT_CHUNKS)  # forward only
      program = compile_program(
          lambda th, ks, o: batch_rollout(lopt.transform(th), o, ks, 100, unroll, flat_carry=True),
          lopt.init(jax.random.PRNGKey(0)), keys, optimizee)
      report(f"W2 {model}", program, unroll)
  if _PTXAS.value:
    ptxas_report()


def ptxas_report(folder: str = PTX_DIR, arch: str = "sm_90a") -> None:
  """Registers, stack frame and spills of each Pallas kernel XLA wrote PTX for in
  ``folder``, in the order compiled (``ptxas -v`` of the CUDA plugin's nvidia package)."""
  try:
    import nvidia
    ptxas = next(p for d in nvidia.__path__ for p in glob.glob(f"{d}/cu*/bin/ptxas"))
  except (ImportError, StopIteration) as e:
    raise SystemExit("gpu_kernels --ptxas: no ptxas in the nvidia packages of the CUDA "
                     f"plugin ({e!r}); pip install \"jax[cuda13]=={jax.__version__}\"") from e
  cuobjdump = next((p for d in nvidia.__path__ for p in glob.glob(f"{d}/cu*/bin/cuobjdump")),
                   None)
  seen = set()
  paths = sorted(glob.glob(f"{folder}/*.ptx"))
  if not paths:
    print(f"gpu_kernels --ptxas: XLA wrote no PTX to {folder} (jax {jax.__version__}'s "
          "--xla_dump_to does not): nothing to assemble", flush=True)
  for path in paths:
    with open(path) as f:
      text = f.read()
    for name in re.findall(r"\.entry\s+((?:lstm_stack|mlp)_\w+)\(", text):
      info = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull],
                            capture_output=True, text=True).stderr
      found = [re.search(pattern, info) for pattern in (
          r"Used (\d+) registers", r"(\d+) bytes stack frame",
          r"(\d+) bytes spill stores, (\d+) bytes spill loads")]
      regs, stack, spill = (m.groups() if m else ("?", "?") for m in found)
      line = (f"ptxas {arch} {name} ({os.path.basename(path)}): {regs[0]} registers and "
              f"a {stack[0]}-byte stack frame per thread; spill instructions store "
              f"{spill[0]}, load {spill[1]} bytes")
      if line not in seen:
        seen.add(line)
        print(line, flush=True)
        if cuobjdump:
          print(sass_line(name, _sass(ptxas, cuobjdump, path, arch)), flush=True)
  if paths and not cuobjdump:
    print("gpu_kernels --ptxas: no cuobjdump in the nvidia packages, so no SASS counts "
          "(pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)", flush=True)


def _sass(ptxas: str, cuobjdump: str, path: str, arch: str) -> str:
  """The SASS of the PTX file ``path`` (``ptxas`` to a cubin, ``cuobjdump -sass``)."""
  with tempfile.TemporaryDirectory() as tmp:
    cubin = os.path.join(tmp, "kernel.cubin")
    subprocess.run([ptxas, f"-arch={arch}", path, "-o", cubin], check=True,
                   capture_output=True)
    out = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
    if out.returncode != 0:  # it disassembles with nvdisasm, a package of its own
      raise SystemExit(f"gpu_kernels --ptxas: cuobjdump -sass failed: {out.stderr.strip()} "
                       "(pip install nvidia-cuda-nvdisasm)")
    return out.stdout


def sass_counts(sass: str) -> collections.Counter:
  """Opcode (without modifiers) -> instructions of that opcode in ``cuobjdump -sass``
  text: each thread's instruction stream, every instruction once (a loop's body once)."""
  return collections.Counter(op for op in re.findall(
      r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass, re.M)
      if op != "NOP")  # the padding after the last instruction


def loop_body(sass: str) -> int:
  """Instructions of the longest loop in ``cuobjdump -sass`` text (from a backward
  branch's target to the branch; the self-branch padding after EXIT aside), 0 if none."""
  ins = [(int(a, 16), op, rest) for a, op, rest in re.findall(
      r"^\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)([^;]*);", sass, re.M)
      if op != "NOP"]
  spans = [(int(m.group(1), 16), a) for a, op, rest in ins if op == "BRA"
           for m in [re.search(r"0x([0-9a-f]+)", rest)] if m and int(m.group(1), 16) < a]
  return max((sum(lo <= a <= hi for a, _, _ in ins) for lo, hi in spans), default=0)


def rows_per_thread(name: str) -> Optional[float]:
  """Rows of the optimizee one thread of fused kernel ``name`` covers in its one pass
  (a program's rows over its threads), or None where the kernel loops over blocks."""
  if (name.startswith("lstm_stack_forward") and lstm_kernel.BLOCKS_PER_PROGRAM == 1
      and not lstm_kernel.FORWARD_PROGRAMS_PER_CORE):
    return lstm_kernel.BLOCK_ROWS / (32 * lstm_kernel.NUM_WARPS)
  if name.startswith("lstm_stack_backward") and lstm_kernel.BACKWARD_BLOCKS_PER_PROGRAM == 1:
    return lstm_kernel.BACKWARD_BLOCK_ROWS / (32 * lstm_kernel.BACKWARD_NUM_WARPS)
  return None


def sass_line(name: str, sass: str, top: int = 8) -> str:
  """What a thread of kernel ``name`` executes: its SASS instructions, per row where the
  kernel makes one pass (``rows_per_thread``; at a GPU's issue rate this bounds the
  kernel from below), the most frequent opcodes (MUFU: transcendentals, HGMMA: Hopper's
  matrix products)."""
  counts = sass_counts(sass)
  total = sum(counts.values())
  rows = rows_per_thread(name)
  body = loop_body(sass)
  per_row = (f", {total / rows:,.0f} per row" if rows else
             " (its loops' bodies counted once" + (f"; the longest loop's body {body:,}"
                                                   if body else "") + ")")
  mix = ", ".join(f"{op} {n}" for op, n in counts.most_common(top))
  return f"SASS {name}: {total:,} instructions per thread{per_row}; {mix}"


if __name__ == "__main__":
  app.run(main)
