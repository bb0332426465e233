"""experiments/hugepages.py: the launchers' one re-execution with glibc's huge-page tunable."""
import os
import subprocess
import sys

import pytest

from experiments import hugepages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_with_tunable_keeps_other_tunables():
  env = hugepages.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "X": "1"}
  assert hugepages.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


def test_tunable_set_reads_each_tunable():
  assert not hugepages.tunable_set({})
  assert not hugepages.tunable_set({"GLIBC_TUNABLES": "glibc.malloc.hugetlb_x=1"})
  assert hugepages.tunable_set({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=0"})


def test_opt_out_and_existing_setting_win():
  assert hugepages.why_not({"L2OJAX_HUGEPAGES": "0"}) == "L2OJAX_HUGEPAGES=0"
  assert "already" in hugepages.why_not({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"),
                                        ("[always] madvise never\n", "always"),
                                        ("garbled\n", None)])
def test_thp_mode_parses_the_kernel_file(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert hugepages.thp_mode(str(path)) == mode
  assert hugepages.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("mode, applies", [("madvise", True), ("always", False),
                                           ("never", False), (None, False)])
def test_only_madvise_mode_needs_the_tunable(monkeypatch, mode, applies):
  monkeypatch.setattr(hugepages, "thp_mode", lambda: mode)
  monkeypatch.setattr(hugepages.sys, "platform", "linux")
  monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.36"))
  assert (hugepages.why_not({}) is None) == applies
  monkeypatch.setattr(hugepages.platform, "libc_ver", lambda: ("glibc", "2.31"))
  assert "2.31" in hugepages.why_not({})


def _run_ensure(extra_env):
  code = ("from experiments import hugepages; hugepages.ensure(); import os; "
          "print('TUNABLES=' + os.environ.get('GLIBC_TUNABLES', ''))")
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "L2OJAX_HUGEPAGES")}
  env.update(extra_env, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=60)
  assert out.returncode == 0, out.stderr
  return out.stdout


def test_ensure_reexecutes_once_with_the_tunable():
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "L2OJAX_HUGEPAGES")}
  reason = hugepages.why_not(env)
  if reason is not None:
    pytest.skip(f"huge pages do not apply on this machine: {reason}")
  assert _run_ensure({}).splitlines() == ["TUNABLES=glibc.malloc.hugetlb=1"]
  assert _run_ensure({"L2OJAX_HUGEPAGES": "0"}).splitlines() == ["TUNABLES="]
