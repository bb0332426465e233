r"""A bounded GPU session: the benchmark's open figures, then the paper-scale trainings.

  python -m experiments.gpu_session --minutes=9 --data_path=mnist10k.npz --out=OUT

runs, in order and within ``--minutes``:

  check          the GPU tests of tests/test_lstm_kernel.py: compiled, the fused LSTM
                 kernels give XLA's losses and meta-gradients (L2O-DM, RNNProp, L2O-DM
                 with a bfloat16 state); the stages marked * need it to pass
  check_mlp      the GPU test of tests/test_mlp_kernel.py: the fused MNIST-MLP loss and
                 gradient kernels give XLA's values and Adam curves; + needs it too
  check_tape     the GPU tests of the residual tape (tests/test_lstm_kernel.py): the
                 meta-step of the stacked residuals (L2O-DM, RNNProp, a bfloat16 state,
                 narrow cotangents); the stages marked ^ need it too
  check_exp2     the GPU tests of EXP2_TANH (tests/test_lstm_kernel.py): its tanh on a
                 grid, and the kernels' curves and meta-gradients to the accurate
                 tolerance (also with KEEP_LOWER_GATES); the stages marked % need it too
  check_fwd_loop the GPU tests of the forward kernel looping over blocks of the optimizees'
                 folded rows (tests/test_lstm_kernel.py): XLA's curves and meta-gradients,
                 and with the residual tape the stacked residuals' meta-step; the stages
                 marked & need it too
  dm_pallas*     W1 of L2O-DM with the fused LSTM kernels, B = 1, 8, 64, and W2, with a
                 profile of each B (the GPU's kernels by time)
  dm_fused_mlp*+ W1 of L2O-DM with both fused kernels (the LSTM stack's and the
                 MLP's), B = 1, 8, 64, and W2 (Adam and L2O-DM on the fused MLP), with
                 a profile of each B
  dm_pipelined*  W1 of L2O-DM, B = 8, 64, and W2 with the LSTM kernels looping over
                 blocks of rows (forward 4, backward 2 per program), the next block's
                 loads pipelined; with a profile of each B
  dm_xla_torch   W1 of L2O-DM with XLA's ops beside the PyTorch peer, B = 1, 8, 64
  dm_bf16*       the fused LSTM kernels with a bfloat16 state, B = 64, 256 (the
                 benchmark's default remat: chunks of 4 steps at B = 256), and W2
                 (half the state's bytes per evaluation step)
  rnnprop*       W1 of RNNProp with the fused kernels, B = 1, 8, 64
  scale          W1 of L2O-Scale, B = 1, 8, 64
  chunks*        W1 of L2O-Scale and RNNProp, B = 1, 8, 64, and W2, since their weights'
                 gradients over the coordinates are summed in chunks of rows and
                 L2O-Scale's few-row products are written elementwise (fewer kernels and
                 bytes per step, as compiled), profiled: against scale and rnnprop
  scale_elementwise  the same for L2O-Scale with every product of its per-parameter GRU
                 written elementwise (products.SMALL_ROWS unbounded), profiled: against
                 chunks
  w2_flat*       W2 of L2O-DM with the fused LSTM kernels since the learned optimizer's
                 loop carries the parameters flat: against dm_loads
  w2_flat_mlp*+  the same with the fused MLP kernel (for Adam too): against dm_fused_mlp
  w2_flat_bf16*+ the same with a bfloat16 state too: against dm_bf16's W2 (4.05x)
  dm_bias_product*  W1 of L2O-DM, B = 1, 8, and W2 with the MNIST MLP's biases' gradients
                 taken from the weights' products (mlp.BIAS_IN_PRODUCT; XLA's MLP),
                 profiled: against dm_bwd_128 (W1) and w2_flat (W2)
  tape_base*     W1 of L2O-DM, B = 8, 64, the fused LSTM kernels as they are by default:
                 the same session's baseline of the tape stages
  exp2_tanh*%    W1 of L2O-DM, B = 8, 64, and W2 with the fused LSTM kernels taking tanh
                 as 1 - 2 / (1 + 2^(2 log2(e) z)) from ex2.approx and rcp.approx
                 (lstm_kernel.EXP2_TANH: float32's accuracy, a third to 43% fewer
                 instructions), profiled: against tape_base and w2_flat
  exp2_keep*%    exp2_tanh's W1 at B = 8, 64 with the backward kernel keeping the lower
                 layer's recomputed gates (lstm_kernel.KEEP_LOWER_GATES): against exp2_tanh
  w2_exp2_bf16*+% W2 of L2O-DM with EXP2_TANH and a bfloat16 state on the fused MLP (issue
                 7's W2 criterion): against w2_flat_bf16
  exp2_best*+%^ W1 of L2O-DM, B = 1, 8, 64, with tape_best's levers but tanh at float32's
                 accuracy (EXP2_TANH, not tanh.approx): the residual tape, narrow
                 cotangents, a bfloat16 state, the fused MLP, the weights' gradient 1
                 stage x 2 programs per multiprocessor; profiled: against tape_best
  exp2_best_unroll*+%^  the same with the segment's loop unrolled 20 steps, W1 at B = 1,
                 8, and W2 (Adam on the fused MLP, unrolled alike)
  fwd_loop*&     W1 of L2O-DM, B = 8, 64, and W2 with the forward kernel's programs
                 reading the weights once for a loop over blocks of the optimizees' rows
                 folded together (lstm_kernel.FORWARD_PROGRAMS_PER_CORE=3), profiled:
                 against tape_base and w2_flat
  fwd_loop_tape*^& fwd_loop's W1 with the residual tape, 2 programs per multiprocessor
                 (187 registers), profiled: against tape
  w2_exp2_bf16_loop*+%&  w2_exp2_bf16 with that loop too: against w2_exp2_bf16
  tape*^         W1 of L2O-DM, B = 1, 8, 64, with each step's saved inputs on a residual
                 tape (--residual_tape: written and read in place, not stacked by the
                 loop and copied out again), profiled: against tape_base
  tape_narrow*^  tape's W1 at B = 8, 64 with the weights' gradient's operands in bfloat16
                 (lstm_kernel.NARROW_COTANGENTS), profiled: against tape_base, tape
  tape_rnnprop*^ tape's for RNNProp, B = 8: against chunks
  dm_loads*      dm_pallas again (W1 B = 1, 8, 64 and W2, profiled) since the fused
                 kernels' loads became contiguous: the baseline of the stages below
  dm_bwd_128*    W1 of L2O-DM, B = 1, 8, 64, the cells' backward kernel on 128 rows per
                 8-warp program (at 64 rows two warpgroups compute each element twice),
                 profiled; the kernel 1.28-1.34x faster, the default since
  check_tanh     the GPU test of the LSTM kernels with tanh.approx.f32 (relative error
                 ~2^-11): XLA's loss curves and meta-gradients to a looser tolerance;
                 # needs it to pass
  dm_best*#      W1 of L2O-DM, B = 1, 8, 64, 256, and W2 with these at once: tanh.approx,
                 the backward kernel on 128 rows (the default now), a bfloat16 state
  dm_best_mlp*+# the same with the fused MLP kernel and dm_grad_2x's weights' gradient
                 kernel too, W1 at B = 1, 8
  tape_best*+#^  dm_best_mlp's levers with the residual tape and narrow cotangents too,
                 W1 at B = 1, 8, 64, profiled: against dm_best_mlp and tape_narrow
  dm_best_unroll*+#  dm_best_mlp's levers with the segment's loop unrolled 20 steps, W1
                 at B = 1, 8 (profiled) and W2 (Adam on the fused MLP, unrolled alike)
  dm_tanh#       W1 of L2O-DM, B = 1, 8, 64, and W2 with the fused LSTM kernels taking
                 tanh from tanh.approx.f32, profiled
  dm_bwd_4w*     W1 of L2O-DM, B = 1, 8, 64, the cells' backward kernel on 64 rows per
                 4-warp program (two programs per multiprocessor), profiled
  dm_grad_2x*    W1 of L2O-DM, B = 1, 8, 64, with the weights' gradient kernel unpipelined
                 (108 registers: two programs per multiprocessor) and twice the partial
                 sums, profiled
  dm_grad_128*   W1 of L2O-DM, B = 1, 8, 64, the weights' gradient kernel on 128-row
                 blocks with 2 pipeline stages (half the loop iterations), profiled
  dm_fwd_128*    W1 of L2O-DM at B = 64 and W2 with a bfloat16 state, the forward
                 kernel on 128 rows per program (against dm_bf16's 64)
  dm_unroll*+    W1 of L2O-DM at B = 1, 8 and W2 with both fused kernels and the
                 segment's loop unrolled 20 steps (as the trainings run it), against
                 dm_fused_mlp
  ncu*+          Nsight Compute's counters of the fused kernels in W1 of L2O-DM at
                 B = 8 (experiments.ncu_kernels): registers, occupancy, DRAM and SM
                 throughput, the warps' stall reasons, and the SASS instructions
                 where the warps were sampled most (last: one run under ncu took
                 its 5 minutes without output)
  train          the paper-scale meta-trainings, resumed: the five L2O-DM variants
                 (experiments.ablation --family=dm) and L2O-Scale with and without
                 CL+IL (--family=scale), seven processes sharing the GPU, until the
                 session's time is up; each pauses with a checkpoint. L2O-DM uses the
                 fused LSTM kernels, every family the fused MLP kernel, only where
                 its check has passed on that GPU and W1 at B = 8 was measured
                 faster with it than without it there, and with the fused LSTM kernels
                 each exact lever (EXP2_TANH, the residual tape, the forward kernel's
                 loop over the folded rows) only where its check
                 passed and W1 at B = 8 was measured faster with it than tape_base (see
                 training_levers); under CUDA MPS
                 where it starts and a JAX client works under it (``--nomps``: not).
                 ``--train_families=scale`` (or ``dm``) trains one family alone: the
                 L2O-Scale pair, two processes, finishes in fewer sessions

A stage runs only when its expected time still leaves ``--train_minutes`` for
the trainings (and is stopped at twice its expected time, ``STAGE_OVERRUN``), and
is skipped when ``bench_results/<gpu>_<stage>.json`` already exists (a check's
records that it passed, and counts only while the code it tested, its
``sources`` without comments and docstrings, is as it was then; ``--redo`` runs
them again): sessions too short for the whole list go on where the last one
stopped. The trainings live in
``experiments/results/gpu_training/<family>/<variant>`` (a checkpoint,
metrics.jsonl, calls.jsonl), so a session on a fresh machine resumes them from
the repository.

Everything a session produced comes back as one archive, ``OUT/session.tar.gz``,
with repository-relative paths (the stages' JSON, the training folders with their
latest checkpoint only), beside ``OUT/session.md`` (what ran, how it ended, the
trainings' progress) and ``OUT/logs.tar.gz``. Back in the repository,

  python -m experiments.gpu_session --unpack=OUT/session.tar.gz

replaces each training folder by the archive's and adds the benchmark JSON. The
trainings' compiled programs come back as ``OUT/compile_cache.tar`` (JAX's persistent
compilation cache, the most recently used up to ``COMPILE_CACHE_BYTES``); ``--unpack``
adds them to ``runs/compile_cache/<gpu>``, an ignored folder the next device call
carries, so that its trainings resume without compiling again.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import tokenize
from typing import Callable, Dict, List, Optional, Sequence

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR = "bench_results"
TRAIN_DIR = os.path.join("experiments", "results", "gpu_training")
# Processes and overrides per family: the ablation's five L2O-DM variants and the L2O-Scale
# pair at once. An unrolled segment loop is 14% faster for L2O-DM; L2O-Scale's took minutes
# to compile.
TRAIN_FAMILIES = {"dm": (5, ("meta.scan_unroll=20",)), "scale": (2, ())}
TRAIN_MEM_FRACTION = "0.12"  # seven processes on one GPU
# The trainings' compiled programs (XLA's persistent cache, GPU autotuning included), kept
# between sessions in an ignored folder the device call carries (``runs/compile_cache/<gpu>``)
# and brought back as OUT/compile_cache.tar: each session's trainings otherwise start by
# compiling again. Never the benchmark stages': they report compile times.
COMPILE_CACHE = os.path.join("runs", "compile_cache")
COMPILE_CACHE_ARCHIVE = "compile_cache.tar"
COMPILE_CACHE_BYTES = 15 * 2**20  # a file a device call brings back is at most 16 MiB
_CACHE_SUFFIX, _ATIME_SUFFIX = "-cache", "-atime"  # jax's cache entries and their use times

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a program: its names (data_path, out)
  are those of experiments.benchmark, which a process may import beside this module."""
  flags.DEFINE_float("minutes", 9.0, "Wall-clock budget of the whole session.")
  flags.DEFINE_float("train_minutes", 4.0, "Minutes kept for the trainings: a benchmark stage "
                     "starts only when its expected time leaves this much.")
  flags.DEFINE_list("stages", None, "Stages to consider (default: all, in order).")
  flags.DEFINE_bool("redo", False, "Run again the stages done before on this GPU.")
  flags.DEFINE_string("data_path", "", "MNIST .npz for the trainings (offline).")
  flags.DEFINE_multi_string("train_override", [], "An --override for every training "
                            "(experiments.ablation's form).")
  flags.DEFINE_list("train_families", None, "The families the trainings stage runs (default: "
                    "all, dm and scale): one alone gets the GPU to itself.")
  flags.DEFINE_string("out", os.environ.get("OUT", "runs/gpu_session"),
                      "Where session.tar.gz, session.md and logs.tar.gz go.")
  flags.DEFINE_string("gpu", "", "Short name of the machine in file names (default: "
                      "from nvidia-smi, e.g. h100; cpu without one).")
  flags.DEFINE_enum("train_lstm_kernel", "auto", ["auto", "xla", "pallas"], "L2O-DM's LSTM "
                    "stack in the trainings; auto: see training_kernel.")
  flags.DEFINE_enum("train_optimizee_kernel", "auto", ["auto", "xla", "pallas"], "The MNIST "
                    "MLP's loss and gradient in the trainings; auto: pallas once check_mlp "
                    "passed on this GPU.")
  flags.DEFINE_bool("mps", True, "Run the trainings under CUDA MPS where it starts and works.")
  flags.DEFINE_bool("compile_cache", True, "The trainings keep their compiled programs in "
                    f"{COMPILE_CACHE}/<gpu> (carry it to the device) and the session brings "
                    f"them back as OUT/{COMPILE_CACHE_ARCHIVE}.")
  flags.DEFINE_string("unpack", "", "Unpack this session.tar.gz into the repository (and "
                      f"{COMPILE_CACHE_ARCHIVE} beside it into {COMPILE_CACHE}/) and exit.")
  flags.DEFINE_bool("plan", False, "Print what a session on --gpu would run, and exit.")


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  argv: tuple            # python's arguments; "{out}" is the stage's output folder
  minutes: float         # expected duration: a stage starts only when this much is left
  needs: tuple = ()      # the checks (stages with bench=False) that must have passed
  # True: writes {out}/<result>, kept as bench_results/<gpu>_<name>.json; False: that
  # file records that it passed
  bench: bool = True
  result: str = "benchmark.json"
  # a check's code under test (repository paths): a check kept from an earlier session
  # counts as passed only while these files are as they were when it passed
  sources: tuple = ()


def _bench(name: str, minutes: float, *args: str, needs: tuple = ()) -> Stage:
  return Stage(name, ("-m", "experiments.benchmark", *args, "--out={out}"), minutes, needs)


def _gpu_tests(name: str, minutes: float, test_file: str, select: str = "gpu",
               sources: tuple = ()) -> Stage:
  """A check: the GPU-only tests of ``test_file`` that pytest's ``-k select`` picks
  (fails at once without a GPU), of the code in ``sources``."""
  return Stage(name, ("-c", "import sys, jax, pytest\n"
                      "if jax.default_backend() != 'gpu':\n"
                      f"  sys.exit(f'{name}: no GPU (jax backend {{jax.default_backend()}})')\n"
                      "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-k', "
                      f"{select!r},\n"
                      f"                      {test_file!r}]))"), minutes, bench=False,
               sources=sources)


_PALLAS = ("--lstm_kernel=pallas", "--torch=off")
# tape_best's levers with tanh at float32's accuracy (EXP2_TANH, not tanh.approx)
_EXP2_BEST = ("--residual_tape", "--kernel_constant=lstm_kernel.NARROW_COTANGENTS=1",
              "--kernel_constant=lstm_kernel.EXP2_TANH=1",
              "--kernel_constant=lstm_kernel.GRADIENT_NUM_STAGES=1",
              "--kernel_constant=lstm_kernel.GRADIENT_PROGRAMS_PER_CORE=2",
              "--optimizee_kernel=pallas", "--dm_state_dtype=bfloat16")
_LSTM_KERNELS = ("l2ojax/models/lstm_kernel.py", "l2ojax/models/cells.py", "l2ojax/gpu.py",
                 "l2ojax/models/residuals.py")
STAGES = (
    # (tanh.approx's test is check_tanh's: its failure keeps out only what needs it)
    _gpu_tests("check", 2.5, "tests/test_lstm_kernel.py",
               "gpu and not approx_tanh and not exp2_tanh and not residual_tape and "
               "not forward_loop",
               sources=_LSTM_KERNELS),
    _gpu_tests("check_mlp", 1.0, "tests/test_mlp_kernel.py",
               sources=("l2ojax/optimizees/mlp_kernel.py", "l2ojax/gpu.py")),
    # apart from check: a failure here keeps out only the stages of the tape
    _gpu_tests("check_tape", 1.5, "tests/test_lstm_kernel.py",
               "residual_tape_on_gpu and not forward_loop",
               sources=_LSTM_KERNELS + ("l2ojax/meta/unroll.py", "l2ojax/meta/step.py")),
    # tanh from ex2.approx and rcp.approx (lstm_kernel.EXP2_TANH): its accuracy on the GPU and
    # the kernels' curves and meta-gradients to the accurate tolerance (also with the backward
    # kernel keeping the lower layer's gates); apart from check, so that a failure keeps out
    # only the stages of EXP2_TANH
    _gpu_tests("check_exp2", 1.0, "tests/test_lstm_kernel.py", "gpu and exp2_tanh",
               sources=_LSTM_KERNELS),
    # the forward kernel's programs reading the weights once for a loop over the blocks of
    # the optimizees' folded rows (lstm_kernel.FORWARD_PROGRAMS_PER_CORE): XLA's curves and
    # meta-gradients; apart from check, a failure keeps out only the stages of the loop
    _gpu_tests("check_fwd_loop", 1.0, "tests/test_lstm_kernel.py", "gpu and forward_loop",
               sources=_LSTM_KERNELS),
    # the fused LSTM kernels against XLA's ops (and the PyTorch peer), each B; the
    # profile lists the GPU's kernels by time (in the log and the JSON)
    _bench("dm_pallas", 2.0, "--models=dm", "--batch_sizes=1,8,64", *_PALLAS,
           "--profile_dir={out}/profile", needs=("check",)),
    # both fused kernels: the fewest kernels per optimizee step (W1 B = 1, W2)
    _bench("dm_fused_mlp", 2.0, "--models=dm", "--batch_sizes=1,8,64", "--optimizee_kernel=pallas",
           *_PALLAS, "--profile_dir={out}/profile", needs=("check", "check_mlp")),
    # the LSTM kernels looping over blocks of rows, the next block's loads pipelined
    # (untimed variants: the trainings keep the defaults)
    _bench("dm_pipelined", 2.0, "--models=dm", "--batch_sizes=8,64", *_PALLAS,
           "--kernel_constant=lstm_kernel.BLOCKS_PER_PROGRAM=4",
           "--kernel_constant=lstm_kernel.NUM_STAGES=3",
           "--kernel_constant=lstm_kernel.BACKWARD_BLOCKS_PER_PROGRAM=2",
           "--kernel_constant=lstm_kernel.BACKWARD_NUM_STAGES=2",
           "--profile_dir={out}/profile", needs=("check",)),
    _bench("dm_xla_torch", 2.0, "--models=dm", "--batch_sizes=1,8,64", "--workloads=w1",
           "--torch_iters=10"),
    _bench("dm_bf16", 2.5, "--models=dm", "--batch_sizes=64,256", "--dm_state_dtype=bfloat16",
           *_PALLAS, needs=("check",)),
    _bench("rnnprop", 1.5, "--models=rnnprop", "--batch_sizes=1,8,64", "--workloads=w1",
           *_PALLAS, needs=("check",)),
    _bench("scale", 1.5, "--models=scale", "--batch_sizes=1,8,64", "--workloads=w1",
           "--torch=off"),
    # L2O-Scale since its products of a few rows (per-tensor and global levels) are written
    # elementwise and its weights' gradients over the coordinates summed in chunks that divide
    # them (as compiled for an H100, B = 8: 132 -> 114 kernels, 804 -> 760 MB per step), against
    # scale; RNNProp's input layer alike (fused LSTM kernels: 44 -> 42 kernels, 874 -> 852 MB)
    _bench("chunks", 3.0, "--models=scale,rnnprop", "--batch_sizes=1,8,64", *_PALLAS,
           "--profile_dir={out}/profile", needs=("check",)),
    # L2O-Scale's per-parameter GRU with its products written elementwise too
    # (products.SMALL_ROWS unbounded): as compiled for an H100, B = 8, 114 -> 109 kernels
    # and 760 -> 727 MB per step, W2 53 -> 52 kernels and 272 -> 248 MB; against chunks
    _bench("scale_elementwise", 2.0, "--models=scale", "--batch_sizes=1,8,64", "--torch=off",
           "--kernel_constant=products.SMALL_ROWS=1000000000", "--profile_dir={out}/profile"),
    # W2 since a learned optimizer's evaluation loop carries the parameters as one vector
    # (Adam's per leaf): as compiled for an H100, L2O-DM 20 -> 19 kernels per step with XLA's
    # MLP (Adam 19), 11 -> 8 with the fused MLP (Adam 11); against dm_loads' W2 (5.25x Adam)
    # and dm_fused_mlp's (3.43x)
    _bench("w2_flat", 1.0, "--models=dm", "--workloads=w2", *_PALLAS, needs=("check",)),
    _bench("w2_flat_mlp", 1.0, "--models=dm", "--workloads=w2", "--optimizee_kernel=pallas",
           *_PALLAS, needs=("check", "check_mlp")),
    _bench("w2_flat_bf16", 1.0, "--models=dm", "--workloads=w2", "--optimizee_kernel=pallas",
           "--dm_state_dtype=bfloat16", *_PALLAS, needs=("check", "check_mlp")),
    # the MNIST MLP's biases' gradients out of the weights' products (mlp.BIAS_IN_PRODUCT): at
    # B = 1 with XLA's MLP three kernels each sum the first bias's gradient again, serially
    # (43 of the step's 208 us in dm_loads' profile); W1 at B = 1, 8 and W2, profiled, against
    # dm_bwd_128 (W1) and w2_flat (W2)
    _bench("dm_bias_product", 1.5, "--models=dm", "--batch_sizes=1,8", *_PALLAS,
           "--kernel_constant=mlp.BIAS_IN_PRODUCT=1", "--profile_dir={out}/profile",
           needs=("check",)),
    # the fused LSTM kernels keeping each step's saved inputs on a residual tape
    # (make_meta_step's residual_tape) and the loop's running sum of the weights' gradient:
    # as compiled for an H100, L2O-DM's step 28 -> 27 kernels and 650 -> 520 MB at B = 8
    # (5,123 -> 4,119 at B = 64), RNNProp's 42 -> 41 and 852 -> 693
    _bench("tape_base", 1.2, "--models=dm", "--batch_sizes=8,64", "--workloads=w1", *_PALLAS,
           needs=("check",)),
    # both LSTM kernels taking tanh from ex2.approx and rcp.approx (EXP2_TANH: float32's
    # accuracy, unlike tanh.approx): as compiled for an H100, the forward kernel 8,598 -> 4,874
    # SASS instructions per row, the backward 16,332 -> 10,928; W1 at B = 8, 64 against
    # tape_base, W2 against Adam in the same loop (w2_flat: the accurate tanh)
    _bench("exp2_tanh", 1.5, "--models=dm", "--batch_sizes=8,64", *_PALLAS,
           "--kernel_constant=lstm_kernel.EXP2_TANH=1", "--profile_dir={out}/profile",
           needs=("check", "check_exp2")),
    # ... and the layers below the top keeping their recomputed gates in the backward kernel
    # (KEEP_LOWER_GATES, never timed): with EXP2_TANH 10,928 -> 9,666 instructions per row
    # and 12 bytes of spills (the accurate tanh's: 152)
    _bench("exp2_keep", 0.8, "--models=dm", "--batch_sizes=8,64", "--workloads=w1", *_PALLAS,
           "--kernel_constant=lstm_kernel.EXP2_TANH=1",
           "--kernel_constant=lstm_kernel.KEEP_LOWER_GATES=true", needs=("check", "check_exp2")),
    # W2 with EXP2_TANH and a bfloat16 state, on the fused MLP as w2_flat_bf16 (the forward
    # kernel 8,820 -> 5,132 instructions per row as compiled; scaled from dm_bf16's 4.05x Adam,
    # ~2.8x): against w2_flat_bf16
    _bench("w2_exp2_bf16", 0.7, "--models=dm", "--workloads=w2", "--optimizee_kernel=pallas",
           "--dm_state_dtype=bfloat16", *_PALLAS, "--kernel_constant=lstm_kernel.EXP2_TANH=1",
           needs=("check", "check_mlp", "check_exp2")),
    # tape_best's levers with EXP2_TANH for tanh.approx (the residual tape, narrow cotangents, a
    # bfloat16 state, the fused MLP, the weights' gradient 1 stage x 2 programs per
    # multiprocessor): issue 7's B = 1 and best-B figures without tanh.approx's error
    _bench("exp2_best", 1.5, "--models=dm", "--batch_sizes=1,8,64", "--workloads=w1", *_PALLAS,
           *_EXP2_BEST, "--profile_dir={out}/profile",
           needs=("check", "check_mlp", "check_exp2", "check_tape")),
    # ... with the segment's loop unrolled 20 steps, W1 at B = 1, 8 and W2 (Adam on the fused
    # MLP, unrolled alike): as compiled for an H100, W1 at B = 1 ~8 kernels per optimizee step
    # where the loop has 15 (its counter, the slot's and minibatch's slices, the stacking of
    # the loss and gradient go)
    _bench("exp2_best_unroll", 1.5, "--models=dm", "--batch_sizes=1,8", "--unroll=20",
           *_PALLAS, *_EXP2_BEST, needs=("check", "check_mlp", "check_exp2", "check_tape")),
    # the forward kernel's programs reading the weights once (~50 KB, TF32-rounded into the
    # products' layout) for a loop over blocks of the optimizees' folded rows, 3 programs per
    # multiprocessor (FORWARD_PROGRAMS_PER_CORE): as compiled for an H100, 4,272 -> 3,721 SASS
    # instructions per thread and block (EXP2_TANH: 2,438 -> 1,905), 161 registers; W1 at B =
    # 8, 64 and W2 against tape_base and w2_flat, then W2 as w2_exp2_bf16 (issue 7's W2)
    _bench("fwd_loop", 1.2, "--models=dm", "--batch_sizes=8,64", *_PALLAS,
           "--kernel_constant=lstm_kernel.FORWARD_PROGRAMS_PER_CORE=3",
           "--profile_dir={out}/profile", needs=("check", "check_fwd_loop")),
    # ... with the residual tape (each optimizee's saved inputs to its own tape), 2 programs
    # per multiprocessor (ptxas: 187 registers; one block per program: 164): against tape
    _bench("fwd_loop_tape", 1.2, "--models=dm", "--batch_sizes=8,64", "--workloads=w1",
           *_PALLAS, "--residual_tape", "--kernel_constant=lstm_kernel.FORWARD_PROGRAMS_PER_CORE=2",
           "--profile_dir={out}/profile", needs=("check", "check_tape", "check_fwd_loop")),
    _bench("w2_exp2_bf16_loop", 0.7, "--models=dm", "--workloads=w2", "--optimizee_kernel=pallas",
           "--dm_state_dtype=bfloat16", *_PALLAS, "--kernel_constant=lstm_kernel.EXP2_TANH=1",
           "--kernel_constant=lstm_kernel.FORWARD_PROGRAMS_PER_CORE=3",
           needs=("check", "check_mlp", "check_exp2", "check_fwd_loop")),
    _bench("tape", 2.0, "--models=dm", "--batch_sizes=1,8,64", "--workloads=w1", *_PALLAS,
           "--residual_tape", "--profile_dir={out}/profile", needs=("check", "check_tape")),
    # ... and the weights' gradient's operands (gate cotangents, outputs) in bfloat16, written
    # and read back once per step: as compiled, 520 -> 418 MB per step at B = 8, 4,119 -> 3,305
    # at B = 64 (with a bfloat16 state 2,979 -> 2,164)
    _bench("tape_narrow", 1.5, "--models=dm", "--batch_sizes=8,64", "--workloads=w1", *_PALLAS,
           "--residual_tape", "--kernel_constant=lstm_kernel.NARROW_COTANGENTS=1",
           "--profile_dir={out}/profile", needs=("check", "check_tape")),
    _bench("tape_rnnprop", 0.7, "--models=rnnprop", "--batch_sizes=8", "--workloads=w1",
           *_PALLAS, "--residual_tape", needs=("check", "check_tape")),
    # dm_pallas again since the kernels' loads became contiguous (59c2871): the weights'
    # gradient and forward kernels' times against dm_pallas's, and the baseline of the
    # stages after it
    _bench("dm_loads", 2.0, "--models=dm", "--batch_sizes=1,8,64", *_PALLAS,
           "--profile_dir={out}/profile", needs=("check",)),
    # the cells' backward kernel without work done twice: at 64 rows and 8 warps (two
    # warpgroups) every thread computes 16 elements of each [64, 32] tile, twice its share
    # (SASS: the same instructions per thread as at 128 rows and 8 warps, or 64 rows and 4);
    # 128 rows and 8 warps, or 64 rows and 4 warps (two programs per multiprocessor)
    _bench("dm_bwd_128", 2.0, "--models=dm", "--batch_sizes=1,8,64", "--workloads=w1",
           *_PALLAS, "--kernel_constant=lstm_kernel.BACKWARD_BLOCK_ROWS=128",
           "--profile_dir={out}/profile", needs=("check",)),
    # tanh from the GPU's approximate instruction in both LSTM kernels (SASS: half the
    # forward kernel's instructions, 41% fewer in the backward's), once its check passed
    _gpu_tests("check_tanh", 1.0, "tests/test_lstm_kernel.py", "gpu and approx_tanh",
               sources=_LSTM_KERNELS),
    # every LSTM lever at once: tanh.approx, the backward kernel on 128 rows (timed alone in
    # dm_bwd_128, the default now), a bfloat16 state; W1 up to B = 256 and W2 (Adam and
    # L2O-DM on XLA's MLP, the default); then W1 at small B with the fused MLP kernel too
    _bench("dm_best", 2.5, "--models=dm", "--batch_sizes=1,8,64,256", *_PALLAS,
           "--kernel_constant=lstm_kernel.APPROX_TANH=1",
           "--kernel_constant=lstm_kernel.BACKWARD_BLOCK_ROWS=128",
           "--dm_state_dtype=bfloat16", needs=("check", "check_tanh")),
    _bench("dm_best_mlp", 1.0, "--models=dm", "--batch_sizes=1,8", "--workloads=w1", *_PALLAS,
           "--kernel_constant=lstm_kernel.APPROX_TANH=1",
           "--kernel_constant=lstm_kernel.BACKWARD_BLOCK_ROWS=128",
           "--kernel_constant=lstm_kernel.GRADIENT_NUM_STAGES=1",
           "--kernel_constant=lstm_kernel.GRADIENT_PROGRAMS_PER_CORE=2",
           "--optimizee_kernel=pallas", "--dm_state_dtype=bfloat16",
           needs=("check", "check_mlp", "check_tanh")),
    # every lever, the residual tape with its running sum and narrow cotangents: as compiled
    # for an H100, 17 -> 15 kernels and 450 -> 272 MB per step at B = 8 (16 -> 15 and 74 -> 43
    # MB at B = 1)
    _bench("tape_best", 1.5, "--models=dm", "--batch_sizes=1,8,64", "--workloads=w1", *_PALLAS,
           "--residual_tape", "--kernel_constant=lstm_kernel.NARROW_COTANGENTS=1",
           "--kernel_constant=lstm_kernel.APPROX_TANH=1",
           "--kernel_constant=lstm_kernel.GRADIENT_NUM_STAGES=1",
           "--kernel_constant=lstm_kernel.GRADIENT_PROGRAMS_PER_CORE=2",
           "--optimizee_kernel=pallas", "--dm_state_dtype=bfloat16",
           "--profile_dir={out}/profile",
           needs=("check", "check_mlp", "check_tanh", "check_tape")),
    # every lever with the segment's loop unrolled 20 steps too (each loop iteration has
    # kernels of its own: the counter, the condition): W1 at B = 1, 8 and W2, Adam on the
    # fused MLP unrolled alike; the closest to issue 7's B = 1 and W2 targets
    _bench("dm_best_unroll", 1.5, "--models=dm", "--batch_sizes=1,8", "--unroll=20", *_PALLAS,
           "--kernel_constant=lstm_kernel.APPROX_TANH=1",
           "--kernel_constant=lstm_kernel.GRADIENT_NUM_STAGES=1",
           "--kernel_constant=lstm_kernel.GRADIENT_PROGRAMS_PER_CORE=2",
           "--optimizee_kernel=pallas", "--dm_state_dtype=bfloat16",
           "--profile_dir={out}/profile", needs=("check", "check_mlp", "check_tanh")),
    _bench("dm_tanh", 2.0, "--models=dm", "--batch_sizes=1,8,64", *_PALLAS,
           "--kernel_constant=lstm_kernel.APPROX_TANH=1", "--profile_dir={out}/profile",
           needs=("check_tanh",)),
    _bench("dm_bwd_4w", 2.0, "--models=dm", "--batch_sizes=1,8,64", "--workloads=w1",
           *_PALLAS, "--kernel_constant=lstm_kernel.BACKWARD_BLOCK_ROWS=64",
           "--kernel_constant=lstm_kernel.BACKWARD_NUM_WARPS=4",
           "--profile_dir={out}/profile", needs=("check",)),
    # the weights' gradient kernel without pipelining (108 registers, not 154): two programs
    # per multiprocessor, twice the partial sums
    _bench("dm_grad_2x", 2.0, "--models=dm", "--batch_sizes=1,8,64", "--workloads=w1",
           *_PALLAS, "--kernel_constant=lstm_kernel.GRADIENT_NUM_STAGES=1",
           "--kernel_constant=lstm_kernel.GRADIENT_PROGRAMS_PER_CORE=2",
           "--profile_dir={out}/profile", needs=("check",)),
    # the weights' gradient kernel on blocks of 128 rows, 2 pipeline stages (3 would ask for
    # 352 KB of shared memory): half the loop iterations, and their waits, for the same
    # instructions per row (ptxas: 255 registers, no spills)
    _bench("dm_grad_128", 2.0, "--models=dm", "--batch_sizes=1,8,64", "--workloads=w1",
           *_PALLAS, "--kernel_constant=lstm_kernel.GRADIENT_BLOCK_ROWS=128",
           "--kernel_constant=lstm_kernel.GRADIENT_NUM_STAGES=2",
           "--profile_dir={out}/profile", needs=("check",)),
    # the forward kernel with 128 rows per 4-warp program (ptxas: 237 registers, two programs
    # per multiprocessor: 256 rows in flight, not 3 x 64), bfloat16 state: against dm_bf16
    _bench("dm_fwd_128", 1.5, "--models=dm", "--batch_sizes=64", "--dm_state_dtype=bfloat16",
           *_PALLAS, "--kernel_constant=lstm_kernel.BLOCK_ROWS=128", needs=("check",)),
    # the segment's loop unrolled, as the trainings run it (meta.scan_unroll=20), with both fused
    # kernels: W1 at B = 1 and 8, and W2 (each loop iteration 20 steps), against dm_fused_mlp
    _bench("dm_unroll", 2.0, "--models=dm", "--batch_sizes=1,8", "--unroll=20",
           "--optimizee_kernel=pallas", *_PALLAS, needs=("check", "check_mlp")),
    # Nsight Compute's counters of the fused kernels (W1 L2O-DM, B = 8, both fused kernels):
    # occupancy, throughput and the warps' stall reasons of the latency-bound kernels, and at
    # which instructions (the program-counter samples). Last: its run under ncu once took
    # the 5 minutes it was allowed without a line of output (H100, 2026-11-27)
    Stage("ncu", ("-m", "experiments.ncu_kernels", "--out={out}",
                  "--benchmark_args=--optimizee_kernel=pallas"), 2.5, ("check", "check_mlp"),
          result="ncu.json"),
)
STAGE_NAMES = tuple(s.name for s in STAGES) + ("train",)
# The trainings pause this long before the session's end (an episode under way, a
# checkpoint, the evaluation of a finished family), get a SIGTERM 40 s before it and are
# killed TRAIN_STOP_SECONDS later.
PACK_MINUTES = 1.5
# A stage running this many times its expected minutes is stopped (exit 124) and the
# session goes on with the next: one that hangs (a profiler's replays, say) does not take
# the others' time. The H100's stages took about half their expected minutes.
STAGE_OVERRUN = 2.0
TRAIN_STOP_SECONDS = 60.0


def train_commands(minutes: float, data_path: str, overrides: Sequence[str],
                   lstm_kernel: str = "xla", optimizee_kernel: str = "xla",
                   families: Optional[Sequence[str]] = None,
                   levers: Sequence[str] = ()) -> Dict[str, list]:
  """One experiments.ablation call per family of ``families`` (default: all of
  TRAIN_FAMILIES), resuming its variants from TRAIN_DIR; ``lstm_kernel`` is L2O-DM's,
  ``optimizee_kernel`` the MNIST MLP's of every family (the same functions either way: a
  run may change them on resuming), ``levers`` L2O-DM's further arguments with
  lstm_kernel="pallas" (``training_levers``)."""
  families = list(TRAIN_FAMILIES) if families is None else list(families)
  unknown = sorted(set(families) - set(TRAIN_FAMILIES))
  if unknown or not families:
    raise ValueError(f"--train_families={','.join(families)}: unknown {unknown}; "
                     f"allowed: one or more of {list(TRAIN_FAMILIES)}")
  extra = [f"--override={o}" for o in overrides]
  if data_path:
    extra.append(f"--override=data.path={os.path.abspath(data_path)}")
  if optimizee_kernel != "xla":
    extra.append(f"--override=optimizee.options.kernel={optimizee_kernel}")
  own = {family: [f"--override={o}" for o in family_overrides]
         for family, (_, family_overrides) in TRAIN_FAMILIES.items()}
  own["dm"].append(f"--override=model.options.lstm_kernel={lstm_kernel}")
  if lstm_kernel == "pallas":
    own["dm"] += list(levers)
  return {family: ["-m", "experiments.ablation", f"--family={family}",
                   f"--workdir={os.path.join(TRAIN_DIR, family)}", f"--processes={n}",
                   f"--max_minutes={minutes:.2f}", "--untrained", *own[family], *extra]
          for family, (n, _) in TRAIN_FAMILIES.items() if family in families}


def short_gpu_name(name: str) -> str:
  """"NVIDIA H100 80GB HBM3" -> "h100": the model number, for file names."""
  m = re.search(r"\b([A-Za-z]\d{2,4})\b", name)
  return (m.group(1) if m else re.sub(r"[^A-Za-z0-9]+", "_", name.strip())).lower()


def gpu_name() -> str:
  """The first accelerator's short name, from nvidia-smi or else from JAX in a child
  process (a JAX backend in this one would hold the GPU's memory); "cpu" without one."""
  commands = (["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
              [sys.executable, "-c", "import jax; d = jax.devices()[0]; "
               "print(d.device_kind if d.platform != 'cpu' else '')"])
  for cmd in commands:
    try:
      out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError):
      continue
    names = out.strip().splitlines()
    return short_gpu_name(names[0]) if names and names[0].strip() else "cpu"
  return "cpu"


def _start(argv: Sequence[str], log, env=None) -> subprocess.Popen:
  """``python argv`` in the repository, in a process group of its own (see ``_stop``)."""
  return subprocess.Popen([sys.executable, *argv], cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen, grace: float) -> int:
  """SIGTERM (a training checkpoints and exits; the ablation passes it on to its trainings),
  then, after ``grace`` seconds, SIGKILL to the whole group: nothing may go on writing
  into the run folders while they are packed."""
  proc.terminate()
  try:
    return proc.wait(timeout=grace)
  except subprocess.TimeoutExpired:
    pass
  finally:
    try:
      os.killpg(proc.pid, signal.SIGKILL)  # children left behind by the group's leader
    except ProcessLookupError:
      pass
  return proc.wait()


def _run(argv: Sequence[str], log_path: str, timeout: float) -> int:
  """Runs ``python argv``; its output goes to ``log_path``. 124 when stopped at ``timeout``."""
  with open(log_path, "a") as log:
    proc = _start(argv, log)
    try:
      return proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
      _stop(proc, grace=30.0)
      return 124


def kept_path(root: str, gpu: str, stage: str) -> str:
  """Where a stage done on ``gpu`` keeps its JSON; its existence means done (a check's:
  see ``check_passed``)."""
  return os.path.join(root, BENCH_DIR, f"{gpu}_{stage}.json")


def _code(text: str) -> str:
  """A Python module's lines without comments, docstrings and blank lines: what its code
  is, the same under any Python version (an AST's dump is not)."""
  docstrings = set()
  for node in ast.walk(ast.parse(text)):
    body = getattr(node, "body", None)
    if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)):
      docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
  comments = {t.start[0]: t.start[1] for t in tokenize.generate_tokens(io.StringIO(text).readline)
              if t.type == tokenize.COMMENT}
  lines = (line[:comments.get(i, len(line))].rstrip()
           for i, line in enumerate(text.splitlines(), 1) if i not in docstrings)
  return "\n".join(line for line in lines if line)


def sources_digest(root: str, sources: Sequence[str]) -> Dict[str, Optional[str]]:
  """Each of ``sources`` (paths under ``root``) -> the SHA-256 of its code (a Python
  file's without comments and docstrings, which a check does not test; other files'
  bytes), None if missing."""
  digest = {}
  for path in sources:
    try:
      with open(os.path.join(root, path), "rb") as f:
        data = f.read()
    except FileNotFoundError:
      digest[path] = None
      continue
    if path.endswith(".py"):
      data = _code(data.decode()).encode()
    digest[path] = hashlib.sha256(data).hexdigest()
  return digest


def check_passed(root: str, gpu: str, name: str, stage_list: Sequence[Stage] = STAGES) -> bool:
  """Whether check ``name`` passed on ``gpu`` for the code now under ``root``: its record
  exists and, where the check names its sources, records theirs as they are now (the
  kernels changed since: it must run again before their timings or trainings count)."""
  kept = kept_path(root, gpu, name)
  if not os.path.exists(kept):
    return False
  sources = next((st.sources for st in stage_list if st.name == name), ())
  if not sources:
    return True
  with open(kept) as f:
    return json.load(f).get("sources") == sources_digest(root, sources)


def run_stages(selected: Sequence[str], gpu: str, deadline: float, train_reserve: float,
               work: str, redo: bool, stage_list: Sequence[Stage] = STAGES,
               root: str = REPO, clock: Callable[[], float] = time.monotonic,
               after_each: Callable[[List[dict]], object] = lambda rows: None) -> List[dict]:
  """Runs the ``selected`` stages of ``stage_list`` in order, each only if it fits before
  ``deadline`` less ``train_reserve`` seconds and was not done on this ``gpu`` before (a
  check: not for the code as it is now); keeps each one's JSON under
  ``root``/bench_results and calls ``after_each(rows)``."""
  rows, passed = [], {}  # check -> whether it passed (this session, or kept from one before)
  for st in stage_list:
    if st.name not in selected:
      continue
    kept = kept_path(root, gpu, st.name)
    left = deadline - clock() - train_reserve
    why = None
    done = os.path.exists(kept) if st.bench else check_passed(root, gpu, st.name, stage_list)
    if not st.bench and done and not redo:
      passed[st.name] = True
    missing = [c for c in st.needs
               if not passed.get(c, check_passed(root, gpu, c, stage_list))]
    if done and not redo:
      why = f"measured before: {os.path.relpath(kept, root)}"
    elif missing:
      why = " and ".join(f"the {c} " + ("failed" if c in passed else "has not passed")
                         for c in missing)
    elif left < 60.0 * st.minutes:
      why = f"{left / 60:.1f} min left, {st.minutes:g} expected"
    if why:
      rows.append({"stage": st.name, "status": "skipped", "why": why})
      continue
    out = os.path.join(work, st.name)
    os.makedirs(out, exist_ok=True)
    t0 = clock()
    log = os.path.join(work, f"{st.name}.log")
    rc = _run([a.replace("{out}", out) for a in st.argv], log,
              min(left, STAGE_OVERRUN * 60.0 * st.minutes))
    row = {"stage": st.name, "status": "ok" if rc == 0 else f"exit {rc}",
           "seconds": round(clock() - t0, 1)}
    if not st.bench:
      passed[st.name] = rc == 0
    if rc == 0:
      os.makedirs(os.path.dirname(kept), exist_ok=True)
      if st.bench:
        shutil.copyfile(os.path.join(out, st.result), kept)
      else:
        record = {"passed": True, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "log_tail": _tail(log, 5)}
        if st.sources:
          record["sources"] = sources_digest(root, st.sources)
        with open(kept, "w") as f:
          json.dump(record, f, indent=2)
      row["kept"] = os.path.relpath(kept, root)
    rows.append(row)
    after_each(rows)
  return rows


MPS_CONTROL = "nvidia-cuda-mps-control"
MPS_PROBE = ("-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))")


def start_mps(work: str, probe: Sequence[str] = MPS_PROBE) -> Optional[Dict[str, str]]:
  """Starts CUDA's multi-process service, so that the trainings' kernels (each process is
  latency-bound at B = 8) may run side by side instead of taking turns on the GPU. Returns
  the variables its clients need, or None where it is missing or a JAX client fails
  under it (then it is stopped again and the trainings take turns)."""
  control = shutil.which(MPS_CONTROL)
  if control is None:
    return None
  env = {"CUDA_MPS_PIPE_DIRECTORY": os.path.join(work, "mps_pipe"),
         "CUDA_MPS_LOG_DIRECTORY": os.path.join(work, "mps_log")}
  for d in env.values():
    os.makedirs(d, exist_ok=True)
  full = {**os.environ, **env}
  try:
    subprocess.run([control, "-d"], env=full, check=True, timeout=60, capture_output=True)
    out = subprocess.run([sys.executable, *probe], env=full, timeout=180, capture_output=True,
                         text=True)
  except (OSError, subprocess.SubprocessError):
    stop_mps(env)
    return None
  if out.returncode != 0 or out.stdout.strip() != "3.0":
    stop_mps(env)
    return None
  return env


def stop_mps(env: Dict[str, str]) -> None:
  control = shutil.which(MPS_CONTROL)
  if control is not None:
    subprocess.run([control], input="quit\n", env={**os.environ, **env}, text=True,
                   timeout=60, capture_output=True)


def run_trainings(commands: Dict[str, list], stop_at: float, work: str,
                  extra_env: Optional[Dict[str, str]] = None) -> List[dict]:
  """All families' ablations at once, sharing the device; one still running at ``stop_at``
  (time.monotonic) gets a SIGTERM: its trainings checkpoint the episode under way and exit."""
  env = {**os.environ, **(extra_env or {})}
  env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", TRAIN_MEM_FRACTION)
  t0 = time.monotonic()
  procs = {}
  for family, argv in commands.items():
    log = open(os.path.join(work, f"train_{family}.log"), "a")
    procs[family] = (_start(argv, log, env), log)
  rows = []
  for family, (proc, log) in procs.items():
    try:  # a family that finished evaluates its variants, which may outlast the budget
      rc = proc.wait(timeout=max(stop_at - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
      rc = _stop(proc, grace=TRAIN_STOP_SECONDS)
    log.close()
    status = {0: "finished", 75: "paused (resumable)"}.get(rc, f"exit {rc}")
    rows.append({"stage": f"train_{family}", "status": status,
                 "seconds": round(time.monotonic() - t0, 1)})
  return rows


def w1_speed(bench_dir: str, gpu: str, stage: str, batch: int) -> Optional[float]:
  """L2O-DM's W1 optimizee-steps/s at ``batch`` in stage ``stage``'s kept JSON on ``gpu``;
  None where it was not measured."""
  path = os.path.join(bench_dir, f"{gpu}_{stage}.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return next((r.get("steps_per_s") for r in json.load(f)["rows"]
                 if r["workload"] == "W1" and r["model"] == "dm" and r["B"] == batch), None)


# How much faster a fused kernel's W1 must be timed for the trainings to use it: above the
# spread of a stage's medians (on an H100, W1 at B = 8 with and without the fused MLP
# kernel: 7,751 and 7,746 optimizee-steps/s, a tie).
FASTER_BY = 1.03


def _faster(root: str, gpu: str, checks: Sequence[str], fused: Sequence[str], other: str,
            batch: int) -> bool:
  """Whether ``checks`` passed on ``gpu`` for the code now under ``root`` and the first of
  the stages ``fused`` measured there (the newest kernels first) ran W1 at ``batch`` at
  least ``FASTER_BY`` times as fast as stage ``other``."""
  bench_dir = os.path.join(root, BENCH_DIR)
  if not all(check_passed(root, gpu, check) for check in checks):
    return False
  stage = next((f for f in fused if os.path.exists(kept_path(root, gpu, f))), None)
  with_kernel = stage and w1_speed(bench_dir, gpu, stage, batch)
  without = w1_speed(bench_dir, gpu, other, batch)
  return bool(with_kernel and without and with_kernel >= FASTER_BY * without)


def _timed_faster(root: str, gpu: str, check: str, fused: Sequence[str], other: str,
                  batch: int) -> str:
  """"pallas" where ``_faster``, else "xla"."""
  return "pallas" if _faster(root, gpu, (check,), fused, other, batch) else "xla"


def training_kernel(root: str, gpu: str, batch: int = 8) -> str:
  """L2O-DM's LSTM stack for the trainings: "pallas" only where the check has passed on
  this GPU for the kernels as they are and both stacks' W1 at the trainings' B were
  measured there, the fused kernels faster (on an H100 their backward kernel was 7x
  slower than XLA's ops at first); the fused kernels' newest timing is dm_loads's."""
  return _timed_faster(root, gpu, "check", ("dm_loads", "dm_pallas"), "dm_xla_torch", batch)


def training_optimizee_kernel(root: str, gpu: str, batch: int = 8) -> str:
  """The MNIST MLP's loss and gradient in the trainings: "pallas" only where check_mlp has
  passed on this GPU and W1 at the trainings' B was measured faster with it there (its
  first version, one program per optimizee, was slower than XLA's ops on an H100)."""
  return _timed_faster(root, gpu, "check_mlp", ("dm_fused_mlp",), "dm_pallas", batch)


def training_levers(root: str, gpu: str, batch: int = 8) -> List[str]:
  """The fused LSTM kernels' levers L2O-DM's trainings take beside lstm_kernel=pallas, as
  experiments.ablation arguments: each that computes the same function to float32's
  rounding, once its check passed on this GPU and W1 at the trainings' B was measured at
  least ``FASTER_BY`` times as fast with it as the same session's baseline (tape_base):
  tanh from ex2.approx and rcp.approx (EXP2_TANH, stage exp2_tanh), the residual tape
  (stage tape), the forward kernel's weights once per program for a loop over the folded
  rows (FORWARD_PROGRAMS_PER_CORE: 3 against tape_base, stage fwd_loop; with the tape 2
  against tape, stage fwd_loop_tape). Those that change the numerics (tanh.approx, a
  bfloat16 state, narrow cotangents) are left to a choice made with the loss curves in
  hand."""
  levers = []
  if _faster(root, gpu, ("check", "check_exp2"), ("exp2_tanh",), "tape_base", batch):
    levers.append("--kernel_constant=lstm_kernel.EXP2_TANH=1")
  taped = _faster(root, gpu, ("check", "check_tape"), ("tape",), "tape_base", batch)
  if taped:
    levers.append("--override=meta.residual_tape=true")
  loop = ((("check", "check_tape", "check_fwd_loop"), ("fwd_loop_tape",), "tape", 2) if taped
          else (("check", "check_fwd_loop"), ("fwd_loop",), "tape_base", 3))
  if _faster(root, gpu, *loop[:3], batch):
    levers.append(f"--kernel_constant=lstm_kernel.FORWARD_PROGRAMS_PER_CORE={loop[3]}")
  return levers


def compile_cache_env(root: str, gpu: str) -> Dict[str, str]:
  """The environment that has a training's jax keep its compiled programs in
  ``root/COMPILE_CACHE/gpu`` (every compile that took a second or more). Where the
  ``filelock`` package is installed (jax needs it for a bounded cache), jax also records
  when each program was last used, and the session keeps the most recently used."""
  path = os.path.join(root, COMPILE_CACHE, gpu)
  os.makedirs(path, exist_ok=True)
  env = {"JAX_COMPILATION_CACHE_DIR": path}
  if importlib.util.find_spec("filelock") is not None:
    env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 * 2**30)  # bounded by the disk, not by this
  return env


def _cache_entries(folder: str) -> List[tuple]:
  """(last use, key, bytes) of each of jax's cache entries in ``folder``, latest use first;
  the last use is jax's record of it where there is one, else when the entry was written."""
  entries = []
  for name in os.listdir(folder) if os.path.isdir(folder) else []:
    if not name.endswith(_CACHE_SUFFIX):
      continue
    key = name[:-len(_CACHE_SUFFIX)]
    path, atime = os.path.join(folder, name), os.path.join(folder, key + _ATIME_SUFFIX)
    size = os.path.getsize(path)
    if os.path.isfile(atime):
      with open(atime, "rb") as f:
        used = int.from_bytes(f.read(), "little")
      size += os.path.getsize(atime)
    else:
      used = os.stat(path).st_mtime_ns
    entries.append((used, key, size))
  return sorted(entries, reverse=True)


def pack_compile_cache(archive: str, gpu: str, root: str = REPO,
                       limit: int = COMPILE_CACHE_BYTES) -> List[str]:
  """Writes ``gpu``'s compile cache to a .tar (the entries are compressed already) of at
  most ``limit`` bytes of entries, the most recently used first; returns the keys kept."""
  folder = os.path.join(root, COMPILE_CACHE, gpu)
  kept, total = [], 0
  with tarfile.open(archive, "w") as tar:
    for _, key, size in _cache_entries(folder):
      if total + size > limit:
        continue
      for suffix in (_CACHE_SUFFIX, _ATIME_SUFFIX):
        if os.path.isfile(os.path.join(folder, key + suffix)):
          tar.add(os.path.join(folder, key + suffix), f"{gpu}/{key}{suffix}")
      kept.append(key)
      total += size
  return kept


def unpack_compile_cache(archive: str, repo: str = REPO) -> List[str]:
  """Adds a compile_cache.tar's entries to ``repo/COMPILE_CACHE``; returns the members."""
  with tarfile.open(archive, "r") as tar:
    members = tar.getmembers()
    for m in members:
      parts = m.name.split("/")
      if (not m.isfile() or len(parts) != 2 or ".." in parts or m.name.startswith("/")
          or not parts[1].endswith((_CACHE_SUFFIX, _ATIME_SUFFIX))):
        raise ValueError(f"{archive}: member {m.name!r} is not a cache entry <gpu>/<key>"
                         f"{_CACHE_SUFFIX} or {_ATIME_SUFFIX}")
    target = os.path.join(repo, COMPILE_CACHE)
    os.makedirs(target, exist_ok=True)
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
      tar.extractall(target, filter="data")
    else:
      tar.extractall(target)
  return [m.name for m in members]


def latest_checkpoints(workdir: str) -> Dict[str, int]:
  """Each run folder under ``workdir`` -> its latest complete checkpoint step."""
  latest = {}
  for root, dirs, _ in os.walk(workdir):
    if os.path.basename(root) == "checkpoints":
      steps = [int(d) for d in dirs if d.isdigit()
               and os.path.exists(os.path.join(root, d, "_CHECKPOINT_METADATA"))]
      if steps:
        latest[os.path.dirname(root)] = max(steps)
      dirs[:] = []
  return latest


def pack(archive: str, paths: Sequence[str], root: str = REPO) -> List[str]:
  """Writes ``paths`` (files or folders, relative to ``root``) to a .tar.gz, leaving out
  logs and every checkpoint but each run's latest; returns the members written."""
  members = []
  with tarfile.open(archive, "w:gz") as tar:
    for rel in paths:
      full = os.path.join(root, rel)
      if os.path.isfile(full):
        tar.add(full, rel)
        members.append(rel)
        continue
      latest = latest_checkpoints(full)
      for folder, dirs, files in os.walk(full):
        dirs.sort()
        if os.path.basename(folder) == "checkpoints":
          keep = str(latest.get(os.path.dirname(folder), ""))
          dirs[:] = [d for d in dirs if d == keep]
        for f in sorted(files):
          if f.endswith(".log"):
            continue
          path = os.path.join(folder, f)
          tar.add(path, os.path.relpath(path, root))
          members.append(os.path.relpath(path, root))
  return members


def unpack(archive: str, repo: str = REPO) -> List[str]:
  """Extracts a session archive into ``repo``: each run folder (one holding checkpoints/)
  in it replaces the repository's; other files are added or overwritten."""
  with tarfile.open(archive, "r:gz") as tar:
    names = tar.getnames()
    for name in names:
      if os.path.isabs(name) or ".." in name.split("/"):
        raise ValueError(f"{archive}: member {name!r} is outside the repository")
      if not any(name == d or name.startswith(d + "/") for d in (BENCH_DIR, TRAIN_DIR)):
        raise ValueError(f"{archive}: member {name!r} is neither under {BENCH_DIR}/ nor "
                         f"under {TRAIN_DIR}/")
    runs = sorted({n.split("/checkpoints/")[0] for n in names if "/checkpoints/" in n})
    for run in runs:
      shutil.rmtree(os.path.join(repo, run), ignore_errors=True)
    if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4
      tar.extractall(repo, filter="data")
    else:
      tar.extractall(repo)
  return runs


def _tail(path: str, lines: int = 30) -> str:
  if not os.path.exists(path):
    return ""
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def summary(rows: List[dict], gpu: str, work: str, status: Dict[str, str]) -> str:
  out = io.StringIO()
  out.write(f"# GPU session on {gpu}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
            "| stage | status | seconds | note |\n|---|---|---|---|\n")
  for r in rows:
    out.write(f"| {r['stage']} | {r['status']} | {r.get('seconds', '')} | "
              f"{r.get('why', r.get('kept', ''))} |\n")
  for family, table in status.items():
    out.write(f"\n## {family} trainings\n\n{table}")
  for r in rows:
    if "seconds" in r:
      out.write(f"\n## {r['stage']}: end of its log\n\n```\n"
                f"{_tail(os.path.join(work, r['stage'] + '.log'))}```\n")
  return out.getvalue()


def main(argv):
  del argv
  if FLAGS.unpack:
    runs = unpack(FLAGS.unpack)
    print(f"unpacked {FLAGS.unpack}; replaced {len(runs)} run folders: {runs}")
    cache = os.path.join(os.path.dirname(FLAGS.unpack), COMPILE_CACHE_ARCHIVE)
    if os.path.isfile(cache):
      entries = unpack_compile_cache(cache)
      programs = sum(e.endswith(_CACHE_SUFFIX) for e in entries)
      print(f"unpacked {cache}: {programs} compiled programs into {COMPILE_CACHE}/")
    return
  deadline = time.monotonic() + 60.0 * FLAGS.minutes
  selected = FLAGS.stages or list(STAGE_NAMES)
  unknown = sorted(set(selected) - set(STAGE_NAMES))
  if unknown:
    raise app.UsageError(f"--stages: unknown {unknown}; allowed: {list(STAGE_NAMES)}")
  if FLAGS.plan:
    print(plan(selected, FLAGS.gpu or gpu_name(), FLAGS.redo), end="")
    return
  if "train" in selected:
    try:
      train_commands(0.0, "", [], families=FLAGS.train_families)
    except ValueError as e:
      raise app.UsageError(str(e)) from e
  if "train" in selected and not FLAGS.data_path:
    raise app.UsageError("--data_path: the trainings need an MNIST .npz (the device is offline);"
                         " e.g. mnist10k.npz")
  if FLAGS.data_path and not os.path.isfile(FLAGS.data_path):
    raise app.UsageError(f"--data_path={FLAGS.data_path!r} is not a file")
  gpu = FLAGS.gpu or gpu_name()
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  work = tempfile.mkdtemp(prefix="gpu_session_")  # stage folders and logs; not under OUT
  reserve = 60.0 * FLAGS.train_minutes if "train" in selected else 0.0
  rows = run_stages(selected, gpu, deadline, reserve, work, FLAGS.redo,
                    after_each=lambda rows: report(out, work, rows, gpu))
  if "train" in selected:
    minutes = (deadline - time.monotonic()) / 60.0 - PACK_MINUTES
    if minutes >= 1.0:
      kernel = FLAGS.train_lstm_kernel
      if kernel == "auto":
        kernel = training_kernel(REPO, gpu)
      optimizee_kernel = FLAGS.train_optimizee_kernel
      if optimizee_kernel == "auto":
        optimizee_kernel = training_optimizee_kernel(REPO, gpu)
      levers = training_levers(REPO, gpu) if FLAGS.train_lstm_kernel == "auto" else []
      mps = start_mps(work) if FLAGS.mps else None
      env = {**(mps or {}), **(compile_cache_env(REPO, gpu) if FLAGS.compile_cache else {})}
      try:
        rows += run_trainings(train_commands(minutes, FLAGS.data_path, FLAGS.train_override,
                                             kernel, optimizee_kernel, FLAGS.train_families,
                                             levers),
                              deadline - 40.0, work, env)
      finally:
        if mps is not None:
          stop_mps(mps)
        kept = (pack_compile_cache(os.path.join(out, COMPILE_CACHE_ARCHIVE), gpu)
                if FLAGS.compile_cache else None)
      next(r for r in rows if r["stage"].startswith("train_"))["why"] = (
          " ".join([f"lstm_kernel={kernel}", *(levers if kernel == "pallas" else [])])
          + f", optimizee kernel={optimizee_kernel}; "
          f"{'under' if mps else 'without'} CUDA MPS; "
          + (f"{len(kept)} compiled programs kept" if kept is not None else "no compile cache"))
    else:
      rows.append({"stage": "train", "status": "skipped", "why": f"{minutes:.1f} min left"})
    print(report(out, work, rows, gpu, trained=True))
  else:
    print(report(out, work, rows, gpu))
  shutil.rmtree(work)


def plan(selected: Sequence[str], gpu: str, redo: bool, root: str = REPO) -> str:
  """The stages a session on ``gpu`` would consider, in order, and the trainings' state."""
  lines = [f"GPU {gpu}:"]
  width = max([len(st.name) for st in STAGES if st.name in selected] + [13])
  for st in STAGES:
    if st.name in selected:
      kept = kept_path(root, gpu, st.name)
      stale = not st.bench and os.path.exists(kept) and not check_passed(root, gpu, st.name)
      if os.path.exists(kept) and not stale and not redo:
        state = f"done: {os.path.relpath(kept, root)}"
      else:
        state = "to run" + (" again: its code changed since it passed" if stale else "")
      lines.append(f"  {st.name:<{width}} {state} ({st.minutes:g} min expected)")
  if "train" in selected:
    kernel = training_kernel(root, gpu)
    if kernel == "xla" and "check" in selected and not check_passed(root, gpu, "check"):
      kernel = "xla, pallas if the check passes and it is timed faster"
    optimizee_kernel = training_optimizee_kernel(root, gpu)
    if optimizee_kernel == "xla" and "check_mlp" in selected and not check_passed(
        root, gpu, "check_mlp"):
      optimizee_kernel = "xla, pallas if check_mlp passes and it is timed faster"
    lines.append(f"  train         L2O-DM with lstm_kernel={kernel}, the MLP's kernel "
                 f"{optimizee_kernel}; runs in {TRAIN_DIR}:")
    for family in TRAIN_FAMILIES:
      folder = os.path.join(root, TRAIN_DIR, family)
      runs = sorted(d for d in os.listdir(folder)
                    if os.path.isdir(os.path.join(folder, d))) if os.path.isdir(folder) else []
      latest = latest_checkpoints(folder) if runs else {}
      lines.append(f"    {family}: " + (", ".join(
          f"{r} (episode {latest.get(os.path.join(folder, r), 0)}"
          f"{', done' if os.path.exists(os.path.join(folder, r, 'theta.msgpack')) else ''})"
          for r in runs) or "not started"))
    cached = len(_cache_entries(os.path.join(root, COMPILE_CACHE, gpu)))
    lines.append(f"    compile cache: {cached} programs in {os.path.join(COMPILE_CACHE, gpu)}"
                 + (" (carry it along)" if cached else ""))
  return "\n".join(lines) + "\n"


def report(out: str, work: str, rows: List[dict], gpu: str, trained: bool = False) -> str:
  """Writes OUT/session.tar.gz (the kept JSON; with ``trained``, the run folders), logs.tar.gz
  and session.md for what has run so far; called after every stage, so a session stopped
  from outside still returns what it finished."""
  kept = [r["kept"] for r in rows if "kept" in r]
  runs = [os.path.join(TRAIN_DIR, f) for f in TRAIN_FAMILIES
          if trained and os.path.isdir(os.path.join(REPO, TRAIN_DIR, f))]
  members = pack(os.path.join(out, "session.tar.gz"), kept + runs)
  with tarfile.open(os.path.join(out, "logs.tar.gz"), "w:gz") as tar:
    tar.add(work, "logs", filter=lambda t: t if t.isdir() or t.name.endswith(".log") else None)
    for f in runs:
      for log in sorted(os.listdir(os.path.join(REPO, f))):
        if log.endswith(".log"):
          tar.add(os.path.join(REPO, f, log), os.path.join("logs", os.path.basename(f), log))
  status = {family: subprocess.run(  # the trainings' progress
      [sys.executable, "-m", "experiments.ablation", f"--family={family}", "--status",
       f"--workdir={os.path.join(TRAIN_DIR, family)}"], cwd=REPO, capture_output=True,
      text=True).stdout for family in TRAIN_FAMILIES} if trained else {}
  text = summary(rows, gpu, work, status) + f"\nsession.tar.gz: {len(members)} files\n"
  with open(os.path.join(out, "session.md"), "w") as f:
    f.write(text)
  return text


if __name__ == "__main__":
  define_flags()
  app.run(main)
