"""experiments.ncu_kernels: reading Nsight Compute's raw CSV, and the run around it (a fake
ncu that prints a canned report; the real one needs an NVIDIA GPU)."""
import json
import os
import subprocess
import sys

import pytest

from experiments import ncu_kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STALLED = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
HEADER = ["ID", "Process ID", "Kernel Name", "gpu__time_duration.sum",
          "launch__registers_per_thread", "launch__block_size", "launch__grid_size",
          "launch__shared_mem_per_block_dynamic", "sm__maximum_warps_per_active_cycle_pct",
          "sm__warps_active.avg.pct_of_peak_sustained_active",
          "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
          "sm__throughput.avg.pct_of_peak_sustained_elapsed",
          STALLED.format("long_scoreboard"), STALLED.format("barrier"),
          STALLED.format("short_scoreboard")]
UNITS = ["", "", "", "msecond", "register/thread", "", "", "Kbyte", "%", "%", "%", "%",
         "", "", ""]


def _row(i, name, ms, barrier):
  return [str(i), "77", name, ms, "245", "256", "15,910", "12.29", "12.50", "12.1", "20.3",
          "31.0", "2.5", barrier, "0.5"]


def _csv(rows):
  quote = lambda r: ",".join(f'"{c}"' for c in r)
  return "\n".join(["| model | B | ... (the benchmark's own table) |",
                    "==PROF== Connected to process 77",
                    quote(HEADER), quote(UNITS)] + [quote(r) for r in rows]) + "\n"


REPORT = _csv([_row(0, "lstm_stack_backward", "3.0", "9.0"),
               _row(1, "lstm_stack_weights_gradient", "2.4", "4.0"),
               _row(2, "lstm_stack_backward", "3.2", "11.0"),
               ["3", "77", "truncated row"]])


def test_raw_csv_is_summarized_per_kernel_with_units_and_stalls_ordered():
  launches = ncu_kernels.parse_raw_csv(REPORT)
  assert len(launches) == 3  # the program's lines, ncu's and the short row are not launches
  kernels = ncu_kernels.summarize(launches)
  assert [k["name"] for k in kernels] == ["lstm_stack_backward", "lstm_stack_weights_gradient"]
  backward = kernels[0]
  assert backward["launches"] == 2
  assert backward["duration_us"] == pytest.approx(3100.0)  # median of 3.0 and 3.2 ms, in us
  assert backward["registers"] == 245 and backward["block"] == 256
  assert backward["grid"] == 15910  # thousands separator read
  assert backward["shared_kib_per_block"] == pytest.approx(12.29 * 1000 / 1024)
  assert backward["achieved_occupancy_pct"] == pytest.approx(12.1)
  assert backward["dram_pct"] == pytest.approx(20.3)
  assert list(backward["stalls"]) == ["barrier", "long_scoreboard", "short_scoreboard"]
  assert backward["stalls"]["barrier"] == pytest.approx(10.0)
  assert kernels[1]["stalls"]["barrier"] == pytest.approx(4.0)
  assert kernels[1]["cycles_per_issue"] is None  # not in this report
  table = ncu_kernels.markdown(kernels)
  assert "| lstm_stack_backward | 2 | 3,100.0 | 245 |" in table
  assert "barrier 10.0, long_scoreboard 2.5" in table


def test_output_without_a_report_has_no_launches():
  assert ncu_kernels.parse_raw_csv("==PROF== No kernels were profiled.\n") == []


def test_ncu_is_found_on_the_path_and_a_bad_path_is_named(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="--ncu="):
    ncu_kernels.find_ncu(str(tmp_path / "missing"))
  fake = tmp_path / "ncu"
  fake.write_text("#!/bin/sh\n")
  fake.chmod(0o755)
  monkeypatch.setenv("PATH", str(tmp_path))
  assert ncu_kernels.find_ncu() == str(fake)


def test_the_command_profiles_the_benchmark_with_extra_arguments_last():
  cmd = ncu_kernels.ncu_command("/bin/ncu", "lstm_stack", 9, "/tmp/b",
                                ["--optimizee_kernel=pallas", "--batch_sizes=64"])
  assert cmd[:3] == ["/bin/ncu", "--target-processes", "all"]
  assert cmd[cmd.index("--kernel-name") + 1] == "regex:lstm_stack"
  assert cmd[cmd.index("--launch-count") + 1] == "9"
  assert ["--csv", "--page", "raw"] == cmd[cmd.index("--csv"):cmd.index("--csv") + 3]
  bench = cmd[cmd.index("experiments.benchmark") + 1:]
  assert bench.index("--batch_sizes=64") > bench.index("--batch_sizes=8")  # the later wins
  assert bench[-1] == "--out=/tmp/b"


def _fake_ncu(tmp_path, report):
  (tmp_path / "report.csv").write_text(report)
  fake = tmp_path / "ncu"
  fake.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo "Version 2025.3.1"; exit 0; fi\n'
                  f'cat {tmp_path / "report.csv"}\n')
  fake.chmod(0o755)
  return str(fake)


def test_a_run_writes_the_csv_and_the_summary(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", "experiments.ncu_kernels",
                         f"--ncu={_fake_ncu(tmp_path, REPORT)}", f"--out={out}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "| lstm_stack_weights_gradient | 1 | 2,400.0 |" in proc.stdout
  result = json.loads((out / "ncu.json").read_text())
  assert result["ncu"] == "Version 2025.3.1"
  assert [k["launches"] for k in result["kernels"]] == [2, 1]
  assert len(result["launches"]) == 3
  assert (out / "ncu.csv").read_text() == REPORT


def test_a_run_that_profiles_nothing_fails_and_says_so(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.ncu_kernels",
                         f"--ncu={_fake_ncu(tmp_path, '==PROF== No kernels were profiled.')}",
                         f"--out={tmp_path / 'out'}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "0 launches read" in proc.stderr
  assert not (tmp_path / "out" / "ncu.json").exists()
