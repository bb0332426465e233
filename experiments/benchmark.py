r"""Speed of meta-training and of evaluation, against PyTorch and Adam.

  python -m experiments.benchmark                       # everything, defaults
  python -m experiments.benchmark --batch_sizes=1,8 --w2_steps=500 --out=/tmp/bench

W1, one meta-iteration: the MNIST MLP optimizee (784-20-10 sigmoid, minibatch
128, data on the device), a segment of T steps for B optimizees, backprop
through the segment, Adam on theta. Reported: median seconds per iteration
after warm-up, optimizee-steps per second (B x T / seconds), compile time of
the meta-step, its compiled memory footprint, the device's peak memory
(where the backend reports it), and the instructions in the compiled loop
bodies per optimizee step (``loop_ops``: about the kernels a GPU launches per
step, what bounds small B there).

W2, evaluation: a learned optimizer (at its initial theta: the cost does not
depend on the values) for N steps on 10 vmapped optimizees, against
``optax.adam`` in the same jitted loop (``l2ojax.meta.batch_rollout``), each
carrying the parameters as ``l2ojax.evaluation`` does (the learned optimizer as
one vector, Adam per leaf).

The data are random arrays of MNIST's shape (10,000 uint8 images 28 x 28,
random labels) unless --data_path names an .npz: speed does not depend on the
pixels, and nothing needs a download. When torch is importable, the PyTorch
peer (shared/bench/torch_dm.py, or experiments/torch_dm_peer.py, its copy)
runs the same W1 in a subprocess, in rounds interleaved with the JAX runs so
that a shared machine slows both alike, and the ratio is printed.

On Linux the benchmark, like the other launchers, re-executes itself once
with glibc's huge-page tunable set (``experiments/hugepages.py``; the PyTorch
peer inherits the environment): XLA:CPU maps its temporaries afresh on every
call and 4 KiB pages make the first touch of them a large part of a CPU
meta-iteration. ``L2OJAX_HUGEPAGES=0`` measures without it; the JSON records
the setting and the minor page faults per meta-iteration.

``--profile_dir=DIR`` also traces 3 meta-iterations of each W1 row with
``jax.profiler`` (a trace per row under DIR, for TensorBoard or XProf) and
prints the device's kernels by total time (``device_kernel_times``; on a GPU:
which kernel a step waits on), kept in the row's JSON as ``kernel_times``.

``--kernel_constant=lstm_kernel.BLOCK_ROWS=128`` (repeatable) sets a tunable of
the fused kernels (an int constant of ``lstm_kernel`` or ``mlp_kernel``), of
the MNIST MLP (``mlp.BIAS_IN_PRODUCT=1``) or of ``products`` (``SMALL_ROWS``)
before anything is traced: other tilings and formulations, timed without
editing the code.

Writes a markdown table to stdout and <out>/benchmark.json.
"""
from __future__ import annotations

import collections
import datetime
import glob
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import optax
from absl import app, flags

from experiments import hugepages, kernel_constants
from l2ojax import gpu, models, optimizees
from l2ojax.meta import remat as remat_lib
from l2ojax.meta import sharding as sharding_lib
from l2ojax.meta import step as step_lib
from l2ojax.meta.unroll import batch_rollout
from l2ojax.models import cells

_MODELS = flags.DEFINE_list("models", ["dm", "rnnprop", "scale"],
                            "Learned optimizers to run; names not registered are skipped.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8", "64", "256"], "W1 meta-batch sizes B.")
_SEGMENT = flags.DEFINE_integer("segment", 20, "W1 segment length T.")
_ITERS = flags.DEFINE_integer("iters", 10, "W1 timed meta-iterations per round.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "W1 untimed meta-iterations after compiling.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Rounds of (JAX, torch) runs, interleaved.")
_REMAT = flags.DEFINE_string("remat", "auto", "Meta-step remat: none | update | update_dots | "
                             "auto (update on the CPU, none on accelerators).")
_REMAT_CHUNK = flags.DEFINE_string("remat_chunk", "auto", "W1: keep the recurrent state every k "
                                   "steps only (0: every step; auto: 4 for B >= 256, else 0).")
_UNROLL = flags.DEFINE_integer("unroll", 1, "Optimizee steps per iteration of the compiled loop "
                               "(W1 and W2).")
_STATE_DTYPE = flags.DEFINE_enum("dm_state_dtype", "", ["", "float32", "bfloat16"],
                                 "L2O-DM's stored LSTM state type (default: the parameters').")
_LSTM_KERNEL = flags.DEFINE_enum("lstm_kernel", "xla", list(cells.KERNELS),
                                  "L2O-DM's and RNNProp's LSTM stack: XLA's ops, or fused Pallas "
                                  "kernels (on a GPU; see cells.lstm_stack_prepare).")
_GRADIENT_CHUNKS = flags.DEFINE_integer(
    "gradient_chunks", 0, "L2O-DM's and RNNProp's partial sums of the LSTM weights' gradient "
    "in a loop of steps (0: the meta-step's choice for B with the fused kernels on a GPU, "
    "else 64 on a GPU, 1 elsewhere; see cells.auto_gradient_chunks).")
_OPTIMIZEE_KERNEL = flags.DEFINE_enum(
    "optimizee_kernel", "xla", list(gpu.KERNELS), "The MNIST MLP's loss and gradient per "
    "step: XLA's ops, or one fused Pallas kernel on a GPU (W1 and W2, for every optimizer; "
    "see optimizees.mlp_kernel).")
_KERNEL_CONSTANTS = flags.DEFINE_multi_string("kernel_constant", [], kernel_constants.FLAG_HELP)
_RESIDUAL_TAPE = flags.DEFINE_bool(
    "residual_tape", False, "W1: the fused LSTM kernels keep each step's saved inputs in one "
    "buffer for the segment, written and read in place (make_meta_step's residual_tape; "
    "with --lstm_kernel=pallas, remat off).")
_SHARD = flags.DEFINE_bool("shard", False, "Shard the meta-batch over all devices.")
_WORKLOADS = flags.DEFINE_list("workloads", ["w1", "w2"], "Which workloads to run.")
_W2_STEPS = flags.DEFINE_integer("w2_steps", 10_000, "W2 optimizee steps.")
_W2_OPTIMIZEES = flags.DEFINE_integer("w2_optimizees", 10, "W2 vmapped optimizees.")
_W2_REPEATS = flags.DEFINE_integer("w2_repeats", 3, "W2 timed runs (after one warm-up).")
_TORCH = flags.DEFINE_enum("torch", "auto", ["auto", "off"],
                           "Run the PyTorch peer when importable.")
_TORCH_ITERS = flags.DEFINE_integer("torch_iters", 5, "Meta-iterations per torch peer run.")
_TORCH_SCRIPT = flags.DEFINE_string("torch_script", "", "Path of the torch peer script "
                                    "(default: shared/bench/torch_dm.py if found, else the copy).")
_DATA_PATH = flags.DEFINE_string("data_path", "", "An MNIST .npz; default: random data.")
_OUT = flags.DEFINE_string("out", ".", "Folder for benchmark.json.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "W1: after timing each B, trace 3 "
                                   "meta-iterations with jax.profiler into this folder and "
                                   "print the device's kernels by total time.")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- environment


def random_mnist_npz(folder: str, n: int = 10_000, seed: int = 0) -> str:
  """An .npz of MNIST's shape and dtype with random content (no download)."""
  rng = np.random.default_rng(seed)
  path = os.path.join(folder, "random_mnist.npz")
  np.savez(path, images=rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
           labels=rng.integers(0, 10, n).astype(np.int32))
  return path


def machine() -> Dict[str, Any]:
  devices = jax.devices()
  try:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                capture_output=True, text=True).stdout.strip())
  except (OSError, subprocess.CalledProcessError):
    commit, dirty = "unknown", False
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "commit": commit + ("+dirty" if dirty else ""),
          "backend": jax.default_backend(), "devices": [d.device_kind for d in devices],
          "device_count": len(devices), "host": platform.node(), "cpu_count": os.cpu_count(),
          "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
          "python": platform.python_version(), "jax": jax.__version__, "optax": optax.__version__,
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
          "transparent_hugepages": hugepages.thp_mode()}


def device_peak_bytes() -> Optional[int]:
  """Peak memory in use on the first device, where the backend tracks it (GPU/TPU)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def compiled_bytes(compiled) -> Optional[int]:
  """Arguments + outputs + temporaries of a compiled program, less donated aliases."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return None
  if m is None:
    return None
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


_BOOKKEEPING = frozenset(["parameter", "get-tuple-element", "tuple", "constant", "bitcast",
                          "async-done", "copy-done", "fusion-done", "all-reduce-done",
                          "all-gather-done", "collective-permute-done", "send-done",
                          "recv-done"])


def _computations(text: str) -> Dict[str, Tuple[str, List[str]]]:
  """name -> (header line, instruction lines) of each computation in a program's text."""
  comps: Dict[str, Tuple[str, List[str]]] = {}
  name = None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      head = line.split()
      name = head[1] if head[0] == "ENTRY" else head[0]
      comps[name] = (line, [])
    elif line.startswith("}"):
      name = None
    elif name is not None:
      comps[name][1].append(line)
  return comps


def _loop_bodies(text: str, comps) -> List[List[str]]:
  """Instruction lines of each loop body that holds a matrix product (the optimizee
  steps, not the random-number loops)."""
  def product(lines, depth=2):  # in the body or in what it calls
    if any(("dot(" in l or "gemm" in l or "custom-call(" in l) for l in lines):
      return True
    called = [c for l in lines for c in re.findall(r"calls=(%[\w.\-]+)", l)]
    return depth > 0 and any(product(comps.get(c, ("", []))[1], depth - 1) for c in called)

  bodies = []
  for body in re.findall(r"\swhile\(.*?body=(%?[\w.\-]+)", text):
    lines = comps.get(body, ("", []))[1]
    if product(lines):
      bodies.append(lines)
  return bodies


def _instruction(line: str):
  """(name, shape text, opcode, operand names) of one instruction line, or None."""
  m = re.match(r"\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*(.*?)\s([a-z][\w-]*)\((.*)$", line)
  if not m:
    return None
  name, shape, op, rest = m.groups()
  depth, args = 0, ""
  for ch in rest:  # the operand list ends at the parenthesis that closes it
    if ch == "(":
      depth += 1
    elif ch == ")":
      if depth == 0:
        break
      depth -= 1
    args += ch
  return name, shape, op, re.findall(r"%[\w.\-]+", args)


def loop_ops_by_kind(text: str) -> List[collections.Counter]:
  """Per loop body of a compiled program's text that holds a matrix product (the
  optimizee steps, not the random-number loops): its instructions by opcode,
  bookkeeping left out."""
  found = []
  for lines in _loop_bodies(text, _computations(text)):
    ops = [m.group(1) for m in (re.search(r"\s([a-z][\w-]*)\(%", l) for l in lines) if m]
    found.append(collections.Counter(op for op in ops if op not in _BOOKKEEPING))
  return found


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16}


def _bytes(shape: str) -> int:
  """Bytes of a shape's text (all elements of a tuple)."""
  total = 0
  for dtype, dims in re.findall(r"\b(pred|[subfc]\d+|bf16)\[([\d,]*)\]", shape):
    total += _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
  return total


def _fusion_bytes(comps, name: str) -> int:
  """Bytes a fused kernel reads and writes: each parameter in full, or only what
  its (dynamic-)slices and gathers take of it (followed through slices of
  slices), nothing of a buffer it updates in place; the output in full, or
  only the update of an in-place slice update."""
  header, lines = comps[name]
  params = dict(re.findall(r"([\w.\-]+): ((?:pred|[subfc]\d+|bf16)\[[\d,]*\])", header))
  insts = [i for i in map(_instruction, lines) if i]
  shapes = {n: shape for n, shape, _, _ in insts}
  shapes.update({"%" + p: shape for p, shape in params.items()})
  users: Dict[str, list] = collections.defaultdict(list)
  for n, _, op, args in insts:
    for position, a in enumerate(args):
      users[a].append((n, op, position))

  def read(value: str) -> int:
    uses = users[value]
    if uses and all(position == 0 and op in ("dynamic-slice", "slice", "gather", "bitcast",
                                             "dynamic-update-slice")
                    for _, op, position in uses):
      return sum(read(n) for n, op, _ in uses if op != "dynamic-update-slice")
    return _bytes(shapes[value])

  total = sum(read("%" + p) for p in params)
  root = next(_instruction(l) for l in lines if l.lstrip().startswith("ROOT"))
  outs = [root] if root[2] != "tuple" else [next(i for i in insts if i[0] == a) for a in root[3]]
  for _, shape, op, args in outs:
    total += _bytes(shapes.get(args[1], "") if op == "dynamic-update-slice" else shape)
  return total


# Fused kernels that read only the rows of a table that an index operand names:
# kernel name -> (the table operands, the index operand).
_GATHERING_KERNELS = {"mlp_value_and_grad": ((0, 1), 2), "mlp_hidden_products": ((0,), 1)}


# Fused kernels that, given a slot (an int32 [1] operand), read or write only that
# slot's rows of a residual tape (``residuals.taped_scan``): kernel name -> (the tape
# operand, whether it is written in place rather than read, an operand of the slot's rows).
_TAPING_KERNELS = {"lstm_stack_forward": (-1, True, 1), "lstm_stack_backward": (0, False, 1),
                   "lstm_stack_weights_gradient": (0, False, 1)}


def _custom_call_bytes(line: str, shape: str, args: List[str], shapes: Dict[str, str]) -> int:
  """Operands and output in full, but of a table that a gathering kernel reads
  (``_GATHERING_KERNELS``) only the rows it gathers (one per int32 index), and of a
  residual tape (``_TAPING_KERNELS``) only the slot's rows read or written."""
  sizes = [_bytes(shapes.get(a, "")) for a in args]
  named = re.search(r'name = "(\w+)"', line)
  taping = _TAPING_KERNELS.get(named.group(1) if named else "")
  if taping and any(re.search(r"s32\[(\d+,)*1\]", shapes.get(a, "")) for a in args):
    tape, written, like = taping
    dims = lambda a: [int(d) for d in re.search(r"\[([\d,]*)\]", shapes[a]).group(1).split(",")]
    slot_bytes = sizes[tape] * dims(args[like])[-2] // dims(args[tape])[-2]
    out = _bytes(shape) - (sizes[tape] - slot_bytes if written else 0)
    sizes[tape] = 0 if written else slot_bytes
    return out + sum(sizes)
  tables, index = _GATHERING_KERNELS.get(named.group(1) if named else "", ((), None))
  if index is not None and index < len(args):
    gathered = sizes[index] // 4
    for t in tables:
      dims = re.search(r"\[(\d+)", shapes.get(args[t], ""))
      rows = int(dims.group(1)) if dims else 0
      if rows:
        sizes[t] = min(sizes[t], sizes[t] // rows * gathered)
  return _bytes(shape) + sum(sizes)


def loop_bytes(text: str) -> List[int]:
  """Per loop body (as ``loop_ops_by_kind``): bytes its kernels read and write per
  iteration, estimated from the shapes of the compiled program (``_fusion_bytes``;
  other kernels: operands and output in full). Caches are ignored, so this is the
  memory traffic of a step too large for them: what bounds large B."""
  comps = _computations(text)
  found = []
  for lines in _loop_bodies(text, comps):
    parsed = [(line, _instruction(line)) for line in lines]
    shapes = {i[0]: i[1] for _, i in parsed if i}
    total = 0
    for line, inst in parsed:
      if inst is None or inst[2] in _BOOKKEEPING:
        continue
      name, shape, op, args = inst
      called = re.search(r"calls=(%[\w.\-]+)", line)
      # an asynchronous fusion (fusion-start ... fusion-done) moves what its computation does
      if op in ("fusion", "fusion-start") and called and called.group(1) in comps:
        total += _fusion_bytes(comps, called.group(1))
      elif op == "custom-call":
        total += _custom_call_bytes(line, shape, args, shapes)
      else:
        total += _bytes(shape) + sum(_bytes(shapes.get(a, "")) for a in args)
    found.append(total)
  return found


def loop_ops(compiled) -> Optional[List[int]]:
  """Instructions in each loop body of a compiled program that holds a matrix
  product (``loop_ops_by_kind``), per body.

  Each fusion, GEMM, copy or async launch counts one: at small B a GPU runs
  one kernel per such instruction per step, and their number, not their size,
  bounds the step (see BENCHMARKS.md). None where the program text is not
  available.
  """
  try:
    text = compiled.as_text()
  except Exception:  # some backends do not expose it
    return None
  return [sum(c.values()) for c in loop_ops_by_kind(text)]


def minor_faults() -> Optional[int]:
  """This process's minor page faults so far (first touches of fresh host memory)."""
  try:
    import resource
  except ImportError:  # not on POSIX
    return None
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def is_out_of_memory(e: Exception) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text or "out of memory" in text


def learned_optimizer(model: str, gradient_chunks: int | None = None):
  """``model`` with the flags' options; ``gradient_chunks`` overrides its flag."""
  options = {}
  if model == "dm" and _STATE_DTYPE.value:
    options["state_dtype"] = _STATE_DTYPE.value
  if model in ("dm", "rnnprop"):
    options["lstm_kernel"] = _LSTM_KERNEL.value
    options["gradient_chunks"] = (_GRADIENT_CHUNKS.value if gradient_chunks is None
                                  else gradient_chunks)
  return models.get(model, **options)


def remat_chunk_for(batch_size: int) -> int:
  choice = _REMAT_CHUNK.value
  if choice == "auto":  # the recurrent states of every step are what B = 256 cannot hold
    # (a residual tape is not recomputed in chunks: it holds every step's)
    return 4 if batch_size >= 256 and not _RESIDUAL_TAPE.value else 0
  try:
    return int(choice)
  except ValueError:
    raise app.UsageError(f"--remat_chunk={choice!r}: an integer >= 0 or 'auto'") from None


def remat_for(batch_size: int) -> Optional[str]:
  choice = _REMAT.value
  # B = 64 without remat: 23 GiB; B = 256 with chunks of 4: 30 GiB (an accelerator's choice).
  if choice == "auto":
    return remat_lib.resolve(remat_lib.AUTO)
  return None if choice == "none" else choice


# ---------------------------------------------------------------- profiles

def device_kernel_times(profile, top: int = 12) -> List[Dict[str, Any]]:
  """The ``top`` kernels of a ``jax.profiler.ProfileData``'s GPU planes by total time:
  name, count, total and mean microseconds (events on the planes' stream lines only, so
  a kernel is counted once, not again on the "XLA Ops" line); [] without a GPU plane."""
  totals = collections.defaultdict(lambda: [0, 0.0])
  for plane in profile.planes:
    if not plane.name.startswith("/device:GPU"):
      continue
    for line in plane.lines:
      if not line.name.startswith("Stream"):
        continue
      for event in line.events:
        t = totals[event.name]
        t[0] += 1
        t[1] += event.duration_ns / 1e3
  rows = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
  return [{"kernel": k[:120], "count": n, "total_us": round(us, 1), "mean_us": round(us / n, 2)}
          for k, (n, us) in rows]


def profile_w1(w1: "W1Run", folder: str, iters: int = 3) -> List[Dict[str, Any]]:
  """Traces ``iters`` meta-iterations of ``w1`` into ``folder``; prints and returns
  ``device_kernel_times`` of the trace."""
  with jax.profiler.trace(folder):
    w1.time(iters, warmup=0)
  paths = sorted(glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True))
  times = device_kernel_times(jax.profiler.ProfileData.from_file(paths[-1])) if paths else []
  for t in times:
    print(f"    {t['total_us'] / iters:10.1f} us/iter {t['count'] // iters:6d} x "
          f"{t['mean_us']:8.2f} us  {t['kernel']}")
  return times


# ---------------------------------------------------------------- W1

class W1Run:
  """One meta-iteration of ``model`` at meta-batch ``batch_size``, compiled once.

  Each ``time`` call is one round: ``warmup`` untimed, then ``iters`` timed
  meta-iterations, continuing from the state the last round left.
  """

  def __init__(self, model: str, batch_size: int, optimizee, *, segment: int,
               remat: Optional[str], shard: bool, seed: int, remat_chunk: int = 0,
               unroll: int = 1, residual_tape: bool = False):
    lopt = learned_optimizer(model)
    outer = optax.adam(1e-3)
    k_theta, k_init, self._key = jax.random.split(jax.random.PRNGKey(seed), 3)
    theta = lopt.init(k_theta)
    outer_state = outer.init(theta)
    init_states = step_lib.make_init_states(lopt, batch_size)
    mesh = sharding_lib.make_mesh() if shard else None
    meta_step = step_lib.make_meta_step(lopt, outer, segment, meta_loss="mean", remat=remat,
                                        remat_chunk=remat_chunk, scan_unroll=unroll, mesh=mesh,
                                        residual_tape=residual_tape)
    if shard:
      init_states = sharding_lib.sharded_init_states(init_states, mesh)
      theta, outer_state, optimizee = sharding_lib.replicate((theta, outer_state, optimizee), mesh)
    states = init_states(theta, k_init, optimizee)
    # the partial sums the meta-step runs with (its choice for this B, where it makes one)
    self.gradient_chunks = getattr(step_lib.for_meta_batch(lopt, states.params, mesh),
                                   "gradient_chunks", None)
    self._carry = (theta, outer_state, states)
    self._optimizee = optimizee
    t0 = time.perf_counter()
    self._compiled = meta_step.lower(theta, outer_state, states, self._key, optimizee).compile()
    self.compile_s = time.perf_counter() - t0
    self.compiled_bytes = compiled_bytes(self._compiled)
    self.loop_ops = loop_ops(self._compiled)

  def _step(self, key):
    theta, outer_state, states = self._carry
    theta, outer_state, states, metrics = self._compiled(theta, outer_state, states, key,
                                                         self._optimizee)
    self._carry = (theta, outer_state, states)
    return metrics

  def time(self, iters: int, warmup: int) -> Dict[str, Any]:
    self._key, sub = jax.random.split(self._key)
    keys = jax.random.split(sub, warmup + iters)
    for k in keys[:warmup]:
      metrics = self._step(k)
    jax.block_until_ready(self._carry)
    seconds, cpu_seconds = [], []
    faults = minor_faults()
    for k in keys[warmup:]:
      t, c = time.perf_counter(), time.process_time()
      metrics = self._step(k)
      jax.block_until_ready(self._carry)
      seconds.append(time.perf_counter() - t)
      cpu_seconds.append(time.process_time() - c)
    faults = (minor_faults() - faults) / max(iters, 1) if faults is not None else None
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "compile_s": self.compile_s,
            "minor_faults_per_iter": faults, "compiled_bytes": self.compiled_bytes,
            "peak_bytes": device_peak_bytes(), "meta_loss": float(metrics["meta_loss"]),
            "gradient_chunks": self.gradient_chunks}


def torch_importable() -> bool:
  try:
    importlib.import_module("torch")
  except ImportError:
    return False
  return True


def torch_script() -> str:
  if _TORCH_SCRIPT.value:
    return _TORCH_SCRIPT.value
  for candidate in (os.path.join(REPO, "..", "shared", "bench", "torch_dm.py"),
                    os.path.join(REPO, "shared", "bench", "torch_dm.py")):
    if os.path.exists(candidate):
      return os.path.normpath(candidate)
  return os.path.join(REPO, "experiments", "torch_dm_peer.py")


def time_torch(batch_size: int, segment: int, iters: int, device: str) -> Dict[str, Any]:
  """One run of the PyTorch peer in a subprocess; its mean seconds per iteration."""
  cmd = [sys.executable, torch_script(), str(batch_size), str(segment), str(iters), device]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    error = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
    return {"error": f"exit {proc.returncode}: {error[0][:300]}"}
  m = re.search(r"iter=([\d.]+)ms", proc.stdout)
  v = re.search(r"torch (\S+)", proc.stdout)
  if not m:
    return {"error": f"unparsed output: {proc.stdout.strip()[:300]}"}
  return {"seconds": float(m.group(1)) / 1e3, "version": v.group(1) if v else "?"}


def run_w1(names: List[str], optimizee, with_torch: bool, rows: List[Dict[str, Any]],
           save) -> None:
  """Appends a row per (model, B) to ``rows`` and calls ``save()`` after each."""
  device = "cuda" if jax.default_backend() == "gpu" else "cpu"
  for model in names:
    for b in [int(x) for x in _BATCH_SIZES.value]:
      remat, chunk = remat_for(b), remat_chunk_for(b)
      row: Dict[str, Any] = {"workload": "W1", "model": model, "B": b, "T": _SEGMENT.value,
                             "remat": remat, "remat_chunk": chunk, "unroll": _UNROLL.value,
                             "residual_tape": _RESIDUAL_TAPE.value,
                             "shard": _SHARD.value, "runs": []}
      torch_seconds: List[float] = []
      w1 = None
      for _ in range(_ROUNDS.value):
        try:  # compiled once; each round times a fresh set of iterations
          w1 = w1 or W1Run(model, b, optimizee, segment=_SEGMENT.value, remat=remat,
                           shard=_SHARD.value, seed=_SEED.value, remat_chunk=chunk,
                           unroll=_UNROLL.value, residual_tape=_RESIDUAL_TAPE.value)
          run = w1.time(_ITERS.value, _WARMUP.value)
        except Exception as e:  # an out-of-memory is a result; anything else is a bug
          if not is_out_of_memory(e):
            raise
          row["error"] = "out of memory: " + str(e).splitlines()[0][:200]
          break
        row["runs"].append(run)
        if with_torch and model == "dm":
          t = time_torch(b, _SEGMENT.value, _TORCH_ITERS.value, device)
          if "error" in t:
            row["torch_error"] = t["error"]
          else:
            torch_seconds.append(t["seconds"])
            row["torch_version"] = t["version"]
      if row["runs"] and _PROFILE_DIR.value:  # after the timed rounds, once
        row["kernel_times"] = profile_w1(w1, os.path.join(_PROFILE_DIR.value, f"w1_{model}_b{b}"))
      if row["runs"]:
        seconds = [s for r in row["runs"] for s in r["seconds"]]
        cpu = [s for r in row["runs"] for s in r["cpu_seconds"]]
        row["median_s"] = statistics.median(seconds)
        row["median_cpu_s"] = statistics.median(cpu)
        row["steps_per_s"] = b * _SEGMENT.value / row["median_s"]
        row["compile_s"] = row["runs"][0]["compile_s"]
        row["compiled_bytes"] = row["runs"][0]["compiled_bytes"]
        row["gradient_chunks"] = row["runs"][0].get("gradient_chunks")
        if w1 is not None and w1.loop_ops is not None:
          # summed over the program's loop bodies (forward, backward, recomputation)
          row["loop_ops"] = w1.loop_ops
          row["loop_ops_per_step"] = sum(w1.loop_ops) / _UNROLL.value
        faults = [r["minor_faults_per_iter"] for r in row["runs"]
                  if r["minor_faults_per_iter"] is not None]
        row["minor_faults_per_iter"] = statistics.median(faults) if faults else None
        peaks = [r["peak_bytes"] for r in row["runs"] if r["peak_bytes"] is not None]
        row["peak_bytes"] = max(peaks) if peaks else None
      if torch_seconds:
        row["torch_seconds"] = torch_seconds
        row["torch_steps_per_s"] = b * _SEGMENT.value / statistics.median(torch_seconds)
        if "steps_per_s" in row:
          row["speedup_vs_torch"] = row["steps_per_s"] / row["torch_steps_per_s"]
      rows.append(row)
      save()
      print(f"  W1 {model} B={b}: " + (row.get("error") or
            f"{row['steps_per_s']:.0f} steps/s, compile {row['compile_s']:.1f} s"
            + (f", torch {row['torch_steps_per_s']:.0f} steps/s" if torch_seconds else "")),
            file=sys.stderr, flush=True)


# ---------------------------------------------------------------- W2

def run_w2(names: List[str], optimizee, rows: List[Dict[str, Any]], save) -> None:
  """Wall time of an N-step evaluation of each learned optimizer and of Adam, a row each
  appended to ``rows``, ``save()`` called after each."""
  steps, n = _W2_STEPS.value, _W2_OPTIMIZEES.value
  keys = jax.random.split(jax.random.PRNGKey(_SEED.value + 1), n)

  def timed(fn, *args) -> Dict[str, Any]:
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    seconds = []
    for _ in range(_W2_REPEATS.value):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      seconds.append(time.perf_counter() - t)
    ops = loop_ops(compiled)
    return {"seconds": seconds, "median_s": statistics.median(seconds), "compile_s": compile_s,
            "loop_ops_per_step": sum(ops) / _UNROLL.value if ops is not None else None}

  unroll = _UNROLL.value
  adam = timed(lambda ks, opt: batch_rollout(optax.adam(1e-3), opt, ks, steps, unroll),
               keys, optimizee)
  rows.append({"workload": "W2", "model": "adam", "steps": steps, "optimizees": n,
               "unroll": unroll, **adam})
  save()
  print(f"  W2 adam: {adam['median_s']:.2f} s", file=sys.stderr, flush=True)
  for model in names:
    lopt = learned_optimizer(model)
    theta = lopt.init(jax.random.PRNGKey(_SEED.value))
    # carrying the parameters flat, as l2ojax.evaluation runs a learned optimizer (Adam is
    # faster per leaf): the same curves
    res = timed(lambda th, ks, opt: batch_rollout(lopt.transform(th), opt, ks, steps, unroll,
                                                  flat_carry=True), theta, keys, optimizee)
    res["flat_carry"] = True
    res["ratio_vs_adam"] = res["median_s"] / adam["median_s"]
    rows.append({"workload": "W2", "model": model, "steps": steps, "optimizees": n,
                 "unroll": unroll, **res})
    save()
    print(f"  W2 {model}: {res['median_s']:.2f} s ({res['ratio_vs_adam']:.2f} x adam)",
          file=sys.stderr, flush=True)


# ---------------------------------------------------------------- report

def _mib(b: Optional[int]) -> str:
  return "n/a" if b is None else f"{b / 2**20:,.0f}"


def _count(x: Optional[float]) -> str:
  return "n/a" if x is None else f"{x:,.0f}"


def markdown(result: Dict[str, Any]) -> str:
  m = result["machine"]
  lines = [f"# l2ojax benchmark: {m['backend']} ({', '.join(sorted(set(m['devices'])))} x "
           f"{m['device_count']}), commit {m['commit']}, {m['date']}", "",
           f"data: {result['data']}; jax {m['jax']}; load average at start {m['load_average']}; "
           f"GLIBC_TUNABLES={m.get('glibc_tunables') or '(unset)'}, transparent huge pages: "
           f"{m.get('transparent_hugepages') or 'unknown'}", ""]
  for note in result["notes"]:
    lines.append(f"note: {note}")
  if result["flags"].get("dm_state_dtype"):
    lines.append(f"note: L2O-DM's LSTM state stored as {result['flags']['dm_state_dtype']}")
  w1 = [r for r in result["rows"] if r["workload"] == "W1"]
  w2 = [r for r in result["rows"] if r["workload"] == "W2"]
  if w1:
    lines += ["", "## W1: one meta-iteration (T = %d), optimizee-steps per second" % w1[0]["T"], "",
              "| model | B | remat | median s/iter | steps/s | compile s | compiled MiB | "
              "peak MiB | page faults/iter | loop ops/step | torch steps/s | x torch |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if any(r.get("unroll", 1) > 1 for r in w1 + w2):
      lines += ["", f"scan unroll: {(w1 + w2)[0].get('unroll', 1)} steps per loop iteration"]
    for r in w1:
      remat = str(r["remat"]) + (f", chunk {r['remat_chunk']}" if r.get("remat_chunk") else "")
      if r.get("gradient_chunks"):  # 0: the backend's default
        remat += f"; {r['gradient_chunks']} partial sums"
      if "error" in r:
        lines.append(f"| {r['model']} | {r['B']} | {remat} | {r['error']} |||||||||")
        continue
      torch = (f"{r['torch_steps_per_s']:,.0f} | {r['speedup_vs_torch']:.2f}"
               if "torch_steps_per_s" in r else "skipped | -")
      lines.append(f"| {r['model']} | {r['B']} | {remat} | {r['median_s']:.4f} | "
                   f"{r['steps_per_s']:,.0f} | {r['compile_s']:.1f} | "
                   f"{_mib(r['compiled_bytes'])} | "
                   f"{_mib(r['peak_bytes'])} | {_count(r.get('minor_faults_per_iter'))} | "
                   f"{_count(r.get('loop_ops_per_step'))} | {torch} |")
  if w2:
    lines += ["", f"## W2: evaluation, {w2[0]['steps']} steps x {w2[0]['optimizees']} optimizees",
              "", "| optimizer | median s | compile s | loop ops/step | x adam |",
              "|---|---|---|---|---|"]
    for r in w2:
      lines.append(f"| {r['model']} | {r['median_s']:.3f} | {r['compile_s']:.1f} | "
                   f"{_count(r.get('loop_ops_per_step'))} | {r.get('ratio_vs_adam', 1.0):.2f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  # compile times are figures here: never a program from a persistent cache
  # (JAX_COMPILATION_CACHE_DIR in the environment would otherwise serve them)
  jax.config.update("jax_enable_compilation_cache", False)
  constants = kernel_constants.set_kernel_constants(_KERNEL_CONSTANTS.value)
  notes = []
  names = []
  for name in _MODELS.value:
    if name in models.names():
      names.append(name)
    else:
      notes.append(f"model {name!r} skipped: not registered (have {models.names()})")
  with_torch = False
  if "w1" in _WORKLOADS.value and _TORCH.value == "auto":
    if not torch_importable():
      notes.append("PyTorch peer skipped: torch is not importable")
    else:
      with_torch = True
      notes.append(f"PyTorch peer: {torch_script()}, {_TORCH_ITERS.value} iterations per round, "
                   f"{_ROUNDS.value} round(s) interleaved with the JAX runs")
  with tempfile.TemporaryDirectory() as tmp:
    if _DATA_PATH.value:
      path, data = _DATA_PATH.value, f"MNIST from {_DATA_PATH.value}"
    else:
      path = random_mnist_npz(tmp, seed=_SEED.value)
      data = "random uint8 data of MNIST's shape (10000 x 28 x 28, random labels), no download"
    optimizee = optimizees.get("mnist_mlp", path=path, kernel=_OPTIMIZEE_KERNEL.value)
  result = {"machine": machine(), "data": data, "notes": notes, "rows": [],
            "flags": {f: flags.FLAGS[f].value for f in
                      ("models", "batch_sizes", "segment", "iters", "warmup", "rounds", "remat",
                       "remat_chunk", "unroll", "dm_state_dtype", "lstm_kernel", "gradient_chunks",
                       "optimizee_kernel", "profile_dir",
                       "shard", "workloads", "w2_steps", "w2_optimizees", "w2_repeats",
                       "torch_iters")}}
  if constants:
    result["flags"]["kernel_constant"] = constants
  for note in notes:
    print(note, file=sys.stderr)
  os.makedirs(_OUT.value, exist_ok=True)
  path = os.path.join(_OUT.value, "benchmark.json")

  def save():  # after every row, so that a run cut short keeps what it measured
    with open(path + ".tmp", "w") as f:
      json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)

  if "w1" in _WORKLOADS.value:
    run_w1(names, optimizee, with_torch, result["rows"], save)
  if "w2" in _WORKLOADS.value:
    run_w2(names, optimizee, result["rows"], save)
  save()
  print(markdown(result))
  print(f"\nwrote {path}", file=sys.stderr)


if __name__ == "__main__":
  hugepages.ensure()  # before any work: it re-executes the process
  # The PyTorch peer shares the GPU: JAX takes memory as it needs it rather than 75% up front.
  # Growing on demand, it must be allowed more than the default 75%: the regions the smaller
  # B's took stay with the allocator, and B = 256 needs one large region beside them.
  if os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false") == "false":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  app.run(main)
