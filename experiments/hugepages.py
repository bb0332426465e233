"""Transparent huge pages for XLA's CPU buffers (Linux with glibc >= 2.35).

XLA:CPU allocates an executable's temporaries afresh on every call. The W1
meta-step's are ~150 MiB, more than glibc keeps in its heap, so each call maps
them anew and, with 4 KiB pages, first-touches ~35,000 pages: about 15 % of a
meta-iteration on a 2-core CPU (BENCHMARKS.md). glibc's ``hugetlb`` tunable
makes malloc ask the kernel for transparent huge pages on those mappings
(``madvise``), which cuts the faults to a few hundred. Tunables are read only
at process start, so a launcher calls ``ensure()`` first and the process
re-executes itself once with the tunable set. ``L2OJAX_HUGEPAGES=0`` turns
this off; it does nothing where it cannot apply or is not needed (not Linux,
not glibc, a glibc older than 2.35, or the kernel's huge pages set to "never"
or already to "always").
"""
from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "L2OJAX_HUGEPAGES"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def tunable_set(env: Mapping[str, str]) -> bool:
  """Whether ``env`` already chooses a ``glibc.malloc.hugetlb`` setting (any value)."""
  return any(t.split("=")[0] == "glibc.malloc.hugetlb"
             for t in env.get("GLIBC_TUNABLES", "").split(":"))


def with_tunable(env: Mapping[str, str]) -> dict:
  """A copy of ``env`` whose GLIBC_TUNABLES also holds ``TUNABLE`` (others kept)."""
  env = dict(env)
  env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), TUNABLE) if t)
  return env


def thp_mode(path: str = _THP_MODE) -> Optional[str]:
  """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def why_not(env: Mapping[str, str]) -> Optional[str]:
  """None where ``ensure`` would re-execute, else the reason it does not."""
  if env.get(OPT_OUT) == "0":
    return f"{OPT_OUT}=0"
  if tunable_set(env):
    return "GLIBC_TUNABLES already sets glibc.malloc.hugetlb"
  if not sys.platform.startswith("linux"):
    return f"not Linux ({sys.platform})"
  libc, version = platform.libc_ver()
  if libc != "glibc":
    return f"not glibc ({libc or 'unknown libc'})"
  try:
    major, minor = (int(x) for x in version.split(".")[:2])
  except ValueError:
    return f"glibc version {version!r} not understood"
  if (major, minor) < (2, 35):
    return f"glibc {version} has no hugetlb tunable (needs 2.35)"
  mode = thp_mode()
  if mode in (None, "never"):
    return "transparent huge pages are unavailable or disabled in the kernel"
  if mode == "always":
    return "the kernel already gives transparent huge pages to all memory"
  return None


def ensure() -> None:
  """Re-executes the running command once with ``TUNABLE`` set, where it applies.

  Call it first in a launcher's ``__main__`` block: whatever ran before is
  repeated by the new process.
  """
  if why_not(os.environ) is not None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_tunable(os.environ))
