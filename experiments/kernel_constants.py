"""``--kernel_constant``: a fused kernel's tunable, set for a whole process.

The fused kernels read their tunables (tiling, tanh's formula) from int constants of
their modules when they are traced; the launchers (benchmark, gpu_kernels, train,
ablation) set them from the command line before anything is traced.
"""
from __future__ import annotations

import importlib
import re
from typing import Dict, List

FLAG_HELP = ("MODULE.NAME=VALUE: a fused kernel's tunable, an int constant of "
             "l2ojax.models.lstm_kernel, l2ojax.optimizees.mlp_kernel, l2ojax.optimizees.mlp or "
             "l2ojax.products read when a kernel is traced (e.g. lstm_kernel.BLOCK_ROWS=128, "
             "lstm_kernel.EXP2_TANH=1), set before anything is traced. Repeatable.")


def set_kernel_constants(settings: List[str]) -> Dict[str, int]:
  """Sets each "MODULE.NAME=VALUE" of ``settings`` (``--kernel_constant``): an existing
  upper-case int (or bool) constant of ``lstm_kernel``, ``mlp_kernel``, ``mlp`` or
  ``products``; returns
  what was set. A bad setting raises ValueError naming it."""
  from l2ojax import products
  from l2ojax.models import lstm_kernel
  from l2ojax.optimizees import mlp_kernel
  mlp = importlib.import_module("l2ojax.optimizees.mlp")  # the package exports a function mlp
  modules = {"lstm_kernel": lstm_kernel, "mlp_kernel": mlp_kernel, "mlp": mlp,
             "products": products}
  done = {}
  for setting in settings:
    m = re.fullmatch(r"(\w+)\.([A-Z][A-Z0-9_]*)=(-?\d+|[Tt]rue|[Ff]alse)", setting.strip())
    module = modules.get(m.group(1)) if m else None
    old = getattr(module, m.group(2), None) if module else None
    if not isinstance(old, int):
      raise ValueError(f"--kernel_constant={setting!r}: expected MODULE.NAME=INT with MODULE in "
                       f"{sorted(modules)} and NAME one of its upper-case int constants")
    value = m.group(3).lower()
    if isinstance(old, bool):
      if value not in ("true", "false", "0", "1"):
        raise ValueError(f"--kernel_constant={setting!r}: {m.group(2)} is a bool")
      new = value in ("true", "1")
    elif value in ("true", "false"):
      raise ValueError(f"--kernel_constant={setting!r}: {m.group(2)} is an int")
    else:
      new = int(value)
      if new < 1:
        raise ValueError(f"--kernel_constant={setting!r}: must be >= 1")
    setattr(module, m.group(2), new)
    done[f"{m.group(1)}.{m.group(2)}"] = new
  return done


def set_from_command_line(settings: List[str]) -> Dict[str, int]:
  """``set_kernel_constants`` for a launcher's ``--kernel_constant`` flags: a bad setting is a
  usage error naming it; what was set is printed (it changes the kernels the run traces)."""
  from absl import app
  try:
    done = set_kernel_constants(settings)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if done:
    print(f"kernel constants: {done}", flush=True)
  return done
