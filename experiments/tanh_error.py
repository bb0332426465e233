r"""How much a coarser tanh in the LSTM moves a learned optimizer's loss curves.

  python -m experiments.tanh_error --data_path=mnist10k.npz --out=DIR

The fused GPU kernels can take tanh from ``tanh.approx.f32`` (``lstm_kernel.
APPROX_TANH``), whose relative error is about 2^-11; that instruction exists only
on a GPU. This emulates an error of that size on any backend, with XLA's ops:
every tanh of the LSTM cells (``l2ojax.models.cells``: the gates' and the cell
state's) rounded to 11 significant bits ("rounded"), or scaled by 1 - 2^-11, the
same size as a bias ("shrunk"), and runs a shipped L2O-DM optimizer on the same
fresh optimizees (same inits, same minibatches) as with the exact tanh
("exact") and with a bfloat16 LSTM state ("bf16_state", the option
``models.dm(state_dtype="bfloat16")``, for scale). Prints and writes
(DIR/tanh_error.json, .md) the mean ln(training loss) at --report_steps.
"""
from __future__ import annotations

import json
import os
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import hugepages
from l2ojax import models, optimizees, pretrained
from l2ojax.meta.unroll import batch_rollout
from l2ojax.models import cells

MODES = ("exact", "rounded", "shrunk", "bf16_state")


def define_flags() -> None:
  """The command line's flags, defined when run as a program (experiments modules
  share flag names such as data_path: importing several in one process must work)."""
  global _OPTIMIZER, _PATH, _STEPS, _RUNS, _SEED, _MODES, _REPORT, _OUT
  _OPTIMIZER = flags.DEFINE_string("optimizer", "dm_cl_il_mnist", "A shipped L2O-DM optimizer.")
  _PATH = flags.DEFINE_string("data_path", "", "MNIST .npz (default: tensorflow-datasets).")
  _STEPS = flags.DEFINE_integer("steps", 2000, "Optimizee steps per run.")
  _RUNS = flags.DEFINE_integer("runs", 10, "Fresh optimizees (vmapped).")
  _SEED = flags.DEFINE_integer("seed", 123, "Seed of the optimizees and minibatches.")
  _MODES = flags.DEFINE_list("modes", list(MODES), f"Of {MODES}.")
  _REPORT = flags.DEFINE_list("report_steps", ["100", "1000", "2000"], "Steps of the table.")
  _OUT = flags.DEFINE_string("out", "", "Folder for tanh_error.json and .md (default: none).")


def round_bits(x: jax.Array, bits: int = 11) -> jax.Array:
  """float32 ``x`` rounded to ``bits`` significant bits (to nearest, ties to even):
  relative error below 2^-bits."""
  drop = 24 - bits
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
  odd = (i >> drop) & 1
  i = (i + jnp.uint32((1 << (drop - 1)) - 1) + odd) & ~jnp.uint32((1 << drop) - 1)
  return jax.lax.bitcast_convert_type(i, jnp.float32)


COARSE = {"rounded": lambda x: round_bits(jnp.tanh(x)),
          "shrunk": lambda x: jnp.tanh(x) * (1.0 - 2.0 ** -11)}


class _CellsNumpy:
  """jax.numpy as ``cells`` sees it, but for tanh: only the LSTM cells' tanh changes
  (the optimizee's functions and every other module keep jax.numpy's)."""

  def __init__(self, tanh):
    self.tanh = tanh

  def __getattr__(self, name):
    return getattr(jnp, name)


def curves(mode: str, name: str, optimizee, keys: jax.Array, steps: int) -> np.ndarray:
  """Loss curves [runs, steps + 1] of the shipped optimizer ``name`` under ``mode``."""
  lopt, theta, _ = pretrained.load_theta(name)
  if mode == "bf16_state":
    lopt = models.dm(state_dtype="bfloat16")
  patch = (mock.patch.object(cells, "jnp", _CellsNumpy(COARSE[mode])) if mode in COARSE
           else mock.patch.object(cells, "jnp", jnp))
  with patch:  # the patch must hold while the rollout is traced
    return np.asarray(jax.jit(lambda k: batch_rollout(lopt.transform(theta), optimizee, k,
                                                      steps))(keys))


def main(argv):
  del argv
  hugepages.ensure()
  unknown = sorted(set(_MODES.value) - set(MODES))
  if unknown:
    raise app.UsageError(f"--modes: unknown {unknown}; allowed: {list(MODES)}")
  lopt, _, _ = pretrained.load_theta(_OPTIMIZER.value)
  if not isinstance(lopt, models.DM):
    raise app.UsageError(f"--optimizer={_OPTIMIZER.value!r} is not an L2O-DM optimizer")
  report = [int(s) for s in _REPORT.value if int(s) <= _STEPS.value]
  optimizee = optimizees.get("mnist_mlp", **({"path": _PATH.value} if _PATH.value else {}))
  keys = jax.random.split(jax.random.PRNGKey(_SEED.value), _RUNS.value)
  rows = {}
  for mode in _MODES.value:
    t0 = time.perf_counter()
    ln = np.log(curves(mode, _OPTIMIZER.value, optimizee, keys, _STEPS.value))
    rows[mode] = {"mean_ln_loss": {s: float(ln[:, s].mean()) for s in report},
                  "ln_loss_last_step": [float(v) for v in ln[:, -1]],
                  "seconds": time.perf_counter() - t0}
    print(f"{mode}: " + ", ".join(f"step {s}: {rows[mode]['mean_ln_loss'][s]:.4f}"
                                  for s in report), flush=True)
  exact = rows.get("exact")
  lines = [f"{_OPTIMIZER.value} on mnist_mlp, {_RUNS.value} runs, seed {_SEED.value}, "
           f"jax {jax.__version__} ({jax.default_backend()}): mean ln(training loss)", "",
           "| LSTM | " + " | ".join(f"step {s:,}" for s in report) + " |",
           "|---|" + "---|" * len(report)]
  for mode, row in rows.items():
    cells_ = [f"{row['mean_ln_loss'][s]:.3f}" + (
        f" ({row['mean_ln_loss'][s] - exact['mean_ln_loss'][s]:+.3f})"
        if exact and mode != "exact" else "") for s in report]
    lines.append(f"| {mode} | " + " | ".join(cells_) + " |")
  print("\n".join(lines))
  if _OUT.value:
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "tanh_error.json"), "w") as f:
      json.dump({"optimizer": _OPTIMIZER.value, "runs": _RUNS.value, "seed": _SEED.value,
                 "steps": _STEPS.value, "jax": jax.__version__,
                 "backend": jax.default_backend(), "modes": rows}, f, indent=2)
    with open(os.path.join(_OUT.value, "tanh_error.md"), "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  define_flags()
  app.run(main)
