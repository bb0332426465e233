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
  assert "SourceCounters" in cmd and "--export" not in cmd
  kept = ncu_kernels.ncu_command("/bin/ncu", "lstm_stack", 9, "/tmp/b", report="/tmp/r/ncu")
  assert kept[kept.index("--export") + 1] == "/tmp/r/ncu"
  assert kept.index("--export") < kept.index(sys.executable)  # ncu's option, not the program's
  assert "--page" not in kept  # the pages come from the report
  assert ncu_kernels.import_command("/bin/ncu", "/tmp/r/ncu.ncu-rep", "source") == [
      "/bin/ncu", "--import", "/tmp/r/ncu.ncu-rep", "--csv", "--page", "source",
      "--print-source", "sass", "--print-units", "base"]
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


def _ncu_kernels(ncu, out):
  """experiments.ncu_kernels run with the fake ``ncu``, writing to ``out``."""
  return subprocess.run([sys.executable, "-m", "experiments.ncu_kernels", f"--ncu={ncu}",
                         f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_run_writes_the_csv_and_the_summary(tmp_path):
  out = tmp_path / "out"
  proc = _ncu_kernels(_fake_ncu(tmp_path, REPORT), out)
  assert proc.returncode == 0, proc.stderr
  assert "| lstm_stack_weights_gradient | 1 | 2,400.0 |" in proc.stdout
  result = json.loads((out / "ncu.json").read_text())
  assert result["ncu"] == "Version 2025.3.1"
  assert [k["launches"] for k in result["kernels"]] == [2, 1]
  assert len(result["launches"]) == 3
  assert (out / "ncu.csv").read_text() == REPORT


def test_a_run_that_profiles_nothing_fails_and_says_so(tmp_path):
  proc = _ncu_kernels(_fake_ncu(tmp_path, '==PROF== No kernels were profiled.'),
                      tmp_path / "out")
  assert proc.returncode != 0
  assert "0 launches read" in proc.stderr
  assert not (tmp_path / "out" / "ncu.json").exists()


SOURCE_HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)",
                 "Warp Stall Sampling (Not-issued Samples)", "Instructions Executed",
                 "stall_long_sb", "stall_barrier", "stall_long_sb_not_issued"]


def _source_csv():
  quote = lambda r: ",".join(f'"{c}"' for c in r)
  lines = ["==PROF== a line of ncu's"]
  # two launches of the weights' gradient (summed by address), one of the forward kernel
  for name, rows in [
      ("lstm_stack_weights_gradient", [["0x10", "DEPBAR.LE SB0, 0x3 ;", "60", "58", "8",
                                        "50", "4", "49"],
                                       ["0x20", "@!P0 LDS R4, [R2] ;", "30", "10", "8",
                                        "2", "20", "1"],
                                       ["0x30", "HGMMA.64x64x8.F32.TF32 R24 ;", "0", "0", "8",
                                        "0", "0", "0"]]),
      ("lstm_stack_forward", [["0x10", "MUFU.TANH R1, R2 ;", "5", "5", "1", "0", "0", "0"]]),
      ("lstm_stack_weights_gradient", [["0x10", "DEPBAR.LE SB0, 0x3 ;", "20", "20", "8",
                                        "20", "0", "20"],
                                       ["0x20", "@!P0 LDS R4, [R2] ;", "10", "0", "8", "0",
                                        "10", "0"],
                                       ["0x30", "HGMMA.64x64x8.F32.TF32 R24 ;", "0", "0", "8",
                                        "0", "0", "0"]])]:
    lines += [quote(["Kernel Name", name]), quote(SOURCE_HEADER)] + [quote(r) for r in rows]
  return "\n".join(lines) + "\n"


def test_source_page_is_summed_per_instruction_and_ranked():
  by_kernel = ncu_kernels.parse_source_csv(_source_csv())
  assert {k: len(v) for k, v in by_kernel.items()} == {"lstm_stack_weights_gradient": 6,
                                                       "lstm_stack_forward": 1}
  grad, forward = ncu_kernels.summarize_source(by_kernel)
  assert grad["name"] == "lstm_stack_weights_gradient" and forward["samples"] == 5
  assert grad["instructions"] == 3 and grad["samples"] == 120  # both launches
  assert [t["address"] for t in grad["top"]] == ["0x10", "0x20"]  # none for 0 samples
  assert grad["top"][0]["share"] == pytest.approx(80 / 120)
  assert grad["top"][0]["reasons"] == {"long_sb": 70, "barrier": 4}  # not-issued left out
  assert grad["by_opcode"] == {"DEPBAR": 80, "LDS": 40, "HGMMA": 0}  # predicate dropped
  assert grad["by_reason"] == {"long_sb": 72, "barrier": 34}
  table = ncu_kernels.source_markdown([grad])
  assert "| 0x10 | `DEPBAR.LE SB0, 0x3 ;` | 66.7% | long_sb 58%, barrier 3% |" in table
  assert "by opcode DEPBAR 67%, LDS 33%" in table


def test_source_page_without_a_samples_column_says_which_columns_it_had():
  text = '"Kernel Name","k"\n"Address","Source","Instructions Executed"\n"0x10","NOP ;","1"\n'
  (k,) = ncu_kernels.summarize_source(ncu_kernels.parse_source_csv(text))
  assert "no column of samples" in k["error"] and "Instructions Executed" in k["error"]


def _exporting_ncu(tmp_path, source_exit=0):
  """A fake ncu that, as the real one with --export, prints no page while profiling but
  writes the report file, and prints its pages when importing it."""
  (tmp_path / "report.csv").write_text(REPORT)
  (tmp_path / "source.csv").write_text(_source_csv())
  fake = tmp_path / "ncu"
  fake.write_text(f"""#!/bin/sh
if [ "$1" = --version ]; then echo "Version 2025.3.1"; exit 0; fi
if [ "$1" = --import ]; then
  case "$*" in
    *"--page source"*) cat {tmp_path / "source.csv"}; exit {source_exit};;
    *) cat {tmp_path / "report.csv"}; exit 0;;
  esac
fi
echo "$XLA_FLAGS" > {tmp_path / "xla_flags"}
while [ $# -gt 0 ]; do
  if [ "$1" = --export ]; then echo report > "$2.ncu-rep"; fi
  shift
done
echo "==PROF== Report: written"
""")
  fake.chmod(0o755)
  return str(fake)


def test_a_run_reads_its_report_file_and_ranks_the_instructions(tmp_path):
  out = tmp_path / "out"
  proc = _ncu_kernels(_exporting_ncu(tmp_path), out)
  assert proc.returncode == 0, proc.stderr
  assert "| lstm_stack_weights_gradient | 1 | 2,400.0 |" in proc.stdout  # the raw page, imported
  assert "| 0x10 | `DEPBAR.LE SB0, 0x3 ;` | 66.7% |" in proc.stdout
  result = json.loads((out / "ncu.json").read_text())
  assert [k["launches"] for k in result["kernels"]] == [2, 1]
  assert [k["name"] for k in result["source"]] == ["lstm_stack_weights_gradient",
                                                   "lstm_stack_forward"]
  assert (out / "ncu_source.csv").read_text() == _source_csv()
  assert "==PROF== Report: written" in proc.stdout  # the profiling run's own output, passed on
  assert (tmp_path / "xla_flags").read_text().split()[-1] == "--xla_gpu_autotune_level=0"


def test_a_source_page_ncu_cannot_print_leaves_the_summary(tmp_path):
  out = tmp_path / "out"
  fake = _exporting_ncu(tmp_path, source_exit=1)
  (tmp_path / "source.csv").write_text("==ERROR== no source page\n")
  proc = _ncu_kernels(fake, out)
  assert proc.returncode == 0, proc.stderr
  result = json.loads((out / "ncu.json").read_text())
  assert len(result["kernels"]) == 2
  assert "exited 1 with no instruction rows" in result["source"]["error"]
  assert "no source page" in result["source"]["error"]
