r"""Hardware counters of the fused kernels on an NVIDIA GPU, read by Nsight Compute.

  python -m experiments.ncu_kernels --out=OUT
  python -m experiments.ncu_kernels --out=OUT --benchmark_args=--optimizee_kernel=pallas

runs one W1 meta-iteration of ``experiments.benchmark`` (L2O-DM, B = 8: the
trainings' B, with thousands of programs per launch like larger B, and a copy of
what a launch writes small enough for ncu to save and restore quickly; a segment
of 2 steps: the kernels' work per launch does not depend on T; the fused LSTM
kernels) under ``ncu`` and keeps, per kernel whose name matches
``--kernels``: its duration, registers per thread, grid and block, the
theoretical and achieved occupancy, DRAM and SM throughput as percentages of
the peak, and the warp stall reasons by cycles per issued instruction (what a
latency-bound kernel waits on). ncu replays each profiled launch once per
metric pass, with the caches flushed, so durations are a kernel's alone, at
the clocks the GPU runs (``--clock-control none``).

ncu also samples the warps' program counters (the SourceCounters section): per
SASS instruction of each kernel, how many samples found a warp there and why it
was not issuing. A kernel of several loops stalls somewhere in particular, and
its aggregate stall reasons do not say where; the instructions that gather the
most samples (a wait on a copy, a barrier, a shared-memory load) do.

Writes OUT/ncu.csv (ncu's raw page: every metric it read, one row per launch),
OUT/ncu_source.csv (ncu's source page: one row per SASS instruction and
launch), OUT/ncu.json (the summary per kernel, the raw rows, and per kernel the
samples by opcode, by reason and the instructions with the most of them) and
markdown tables to stdout. Fails, with a message, where ncu is not found or
reads nothing; a source page ncu cannot print is reported in ncu.json and
leaves the rest as it is.
"""
from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

from absl import app, flags

# Sections: speed of light (DRAM and SM throughput), occupancy, launch statistics
# (registers, grid, block, shared memory) and warp states (the stall reasons).
# SourceCounters: the program-counter samples per SASS instruction (ncu's source page).
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "SourceCounters")
BENCHMARK_ARGS = ("--models=dm", "--batch_sizes=8", "--workloads=w1", "--segment=2",
                  "--iters=1", "--warmup=0", "--rounds=1", "--torch=off",
                  "--lstm_kernel=pallas")
# Raw metric names of the summary's fields; the first present is taken.
FIELDS = {
    "duration_us": ("gpu__time_duration.sum",),
    "registers": ("launch__registers_per_thread",),
    "block": ("launch__block_size",),
    "grid": ("launch__grid_size",),
    # Triton's kernels take their shared memory dynamically
    "shared_kib_per_block": ("launch__shared_mem_per_block_dynamic",
                             "launch__shared_mem_per_block"),
    "theoretical_occupancy_pct": ("sm__maximum_warps_per_active_cycle_pct",),
    "achieved_occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active",),
    "dram_pct": ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                 "dram__throughput.avg.pct_of_peak_sustained_elapsed"),
    "sm_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed",),
    "cycles_per_issue": ("smsp__average_warp_latency_per_inst_issued.ratio",),
}
# Scale of a field's value by the unit ncu gives it (to us, KiB).
UNITS = {"duration_us": {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3, "second": 1e6},
         "shared_kib_per_block": {"byte": 1 / 1024, "Kbyte": 1000 / 1024, "Kibyte": 1.0,
                                  "Mbyte": 1e6 / 1024, "Mibyte": 1024.0}}
STALL = re.compile(r"^smsp__average_warps?_(?:latency_)?issue_stalled_(\w+?)"
                   r"(?:_per_issue_active)?\.ratio$")
# The source page's column of samples per instruction (the first present), and its columns
# of samples per stall reason (ncu's short names, or the raw metric names).
SAMPLES = ("Warp Stall Sampling (All Samples)", "# Samples", "Warp Stall Sampling (All)")
SOURCE_STALL = re.compile(r"^(?:stall_(\w+)|smsp__pcsamp_warps_issue_stalled_(\w+))$")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("out", ".", "Folder for ncu.csv and ncu.json.")
  flags.DEFINE_string("ncu", "", "Path of ncu (default: on PATH, else under /opt/nvidia or "
                      "/usr/local/cuda).")
  flags.DEFINE_string("kernels", "lstm_stack|mlp_", "Regular expression of the kernel names "
                      "to profile.")
  flags.DEFINE_integer("launch_count", 16, "Launches profiled (all matching kernels together: "
                       "a 2-step segment launches 6 with XLA's MLP, 10 with the fused one).")
  flags.DEFINE_string("benchmark_args", "", "More arguments for experiments.benchmark (after "
                      "the defaults, so they win), split as a shell would.")


def find_ncu(given: str = "") -> str:
  """ncu's path: ``given``, else on PATH, else the newest under /opt/nvidia/nsight-compute
  or /usr/local/cuda*/bin; a clear error where there is none."""
  if given:
    if not os.access(given, os.X_OK):
      raise FileNotFoundError(f"--ncu={given!r} is not an executable file")
    return given
  found = shutil.which("ncu")
  if found:
    return found
  candidates = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu")
                      + glob.glob("/usr/local/cuda*/bin/ncu"))
  if candidates:
    return candidates[-1]
  raise FileNotFoundError("ncu (Nsight Compute) not found on PATH, under "
                          "/opt/nvidia/nsight-compute or /usr/local/cuda*/bin; pass --ncu")


def ncu_command(ncu: str, kernels: str, launch_count: int, benchmark_out: str,
                benchmark_args: Sequence[str] = (), report: str = "") -> List[str]:
  """ncu profiling one W1 meta-iteration of the benchmark; with ``report``, also kept as
  the report file ``report``.ncu-rep (which ``import_command`` prints pages of)."""
  sections = [a for s in SECTIONS for a in ("--section", s)]
  # exporting, the pages are printed from the report afterwards (import_command), as
  # ncu's documentation does it; without, the raw page goes to stdout
  output = (["--import-source", "no", "--export", report, "--force-overwrite"] if report
            else ["--csv", "--page", "raw", "--print-units", "base"])
  return [ncu, "--target-processes", "all", "--kernel-name", f"regex:{kernels}",
          "--launch-count", str(launch_count), "--clock-control", "none", *sections, *output,
          sys.executable, "-m", "experiments.benchmark", *BENCHMARK_ARGS, *benchmark_args,
          f"--out={benchmark_out}"]


def import_command(ncu: str, report: str, page: str) -> List[str]:
  """ncu printing page ``page`` (raw, source) of the report file ``report`` as CSV; the
  source page as SASS, one row per instruction."""
  source = ["--print-source", "sass"] if page == "source" else []
  return [ncu, "--import", report, "--csv", "--page", page, *source, "--print-units", "base"]


def _number(text: str) -> Optional[float]:
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return None


def parse_raw_csv(text: str) -> List[Dict[str, str]]:
  """The launches of ncu's ``--csv --page raw`` output: the header row of metric names, a
  row of their units (kept under the key ``"units"``), then one row per launch; lines
  before the header (the program's own output, ncu's ``==PROF==`` lines) are skipped."""
  lines = text.splitlines()
  start = next((i for i, line in enumerate(lines)
                if line.startswith('"') and '"Kernel Name"' in line), None)
  if start is None:
    return []
  rows = list(csv.reader(io.StringIO("\n".join(
      line for line in lines[start:] if line.startswith('"')))))
  header, units, data = rows[0], rows[1], rows[2:]
  unit_of = dict(zip(header, units))
  launches = []
  for row in data:
    if len(row) != len(header):
      continue
    launch = dict(zip(header, row))
    launch["units"] = unit_of
    launches.append(launch)
  return launches


def _value(launch: Dict[str, str], field: str) -> Optional[float]:
  for name in FIELDS[field]:
    if name in launch:
      v = _number(launch[name])
      if v is not None:
        return v * UNITS.get(field, {}).get(launch["units"].get(name, ""), 1.0)
  return None


def summarize(launches: List[Dict[str, str]]) -> List[dict]:
  """Per kernel name, in order of first launch: the number of launches, the median of
  each field over them, and the stall reasons (cycles per issued instruction), largest
  first."""
  by_name: Dict[str, List[Dict[str, str]]] = {}
  for launch in launches:
    by_name.setdefault(launch.get("Kernel Name", "?"), []).append(launch)
  kernels = []
  for name, group in by_name.items():
    row: dict = {"name": name, "launches": len(group)}
    for field in FIELDS:
      values = [v for v in (_value(l, field) for l in group) if v is not None]
      row[field] = statistics.median(values) if values else None
    stalls: Dict[str, List[float]] = {}
    for launch in group:
      for metric, text in launch.items():
        m = STALL.match(metric)
        v = _number(text) if m and isinstance(text, str) else None
        if v is not None:
          stalls.setdefault(m.group(1), []).append(v)
    row["stalls"] = dict(sorted(((k, statistics.median(v)) for k, v in stalls.items()),
                                key=lambda kv: -kv[1]))
    kernels.append(row)
  return kernels


def markdown(kernels: List[dict], top_stalls: int = 4) -> str:
  def fmt(v, digits=1):
    return "-" if v is None else f"{v:,.{digits}f}"
  lines = ["| kernel | launches | us | registers | block | grid | occupancy % (theor. / "
           "achieved) | DRAM % | SM % | cycles per issue | top stalls (cycles per issue) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for k in kernels:
    stalls = ", ".join(f"{r} {v:.1f}" for r, v in list(k["stalls"].items())[:top_stalls])
    lines.append(f"| {k['name']} | {k['launches']} | {fmt(k['duration_us'])} | "
                 f"{fmt(k['registers'], 0)} | {fmt(k['block'], 0)} | {fmt(k['grid'], 0)} | "
                 f"{fmt(k['theoretical_occupancy_pct'])} / {fmt(k['achieved_occupancy_pct'])}"
                 f" | {fmt(k['dram_pct'])} | {fmt(k['sm_pct'])} | "
                 f"{fmt(k['cycles_per_issue'])} | {stalls or '-'} |")
  return "\n".join(lines) + "\n"


def parse_source_csv(text: str) -> Dict[str, List[Dict[str, str]]]:
  """Kernel name -> its instruction rows (each a dict by column) of ncu's ``--page source
  --csv --print-source sass`` output: a ``"Kernel Name",NAME`` row before each launch's
  table, whose header row starts with the address column; other lines are skipped."""
  by_kernel: Dict[str, List[Dict[str, str]]] = {}
  kernel, header = "?", None
  for row in csv.reader(io.StringIO("\n".join(
      line for line in text.splitlines() if line.startswith('"')))):
    if not row:
      continue
    if row[0] == "Kernel Name":
      kernel, header = (row[1] if len(row) > 1 else "?"), None
    elif row[0].lstrip("# ") == "Address" and "Source" in row:
      header = row
    elif header is not None and len(row) == len(header):
      by_kernel.setdefault(kernel, []).append(dict(zip(header, row)))
  return by_kernel


def _opcode(source: str) -> str:
  return (PREDICATE.sub("", source.strip()).split(None, 1) or ["?"])[0].split(".")[0]


def summarize_source(by_kernel: Dict[str, List[Dict[str, str]]], top: int = 25) -> List[dict]:
  """Per kernel: the program-counter samples in all, by opcode and by stall reason, and
  the ``top`` instructions with the most (summed over the kernel's launches by address),
  each with its share of the kernel's samples and its largest reasons."""
  summary = []
  for name, rows in by_kernel.items():
    column = next((c for c in SAMPLES if c in rows[0]), None)
    if column is None:
      summary.append({"name": name, "error": f"no column of samples among {list(rows[0])}"})
      continue
    sites: Dict[str, dict] = {}
    for row in rows:
      address = row.get("Address", row.get("# Address", "?")).strip()
      site = sites.setdefault(address, {"address": address,
                                        "source": row.get("Source", "").strip(),
                                        "samples": 0.0, "reasons": {}})
      site["samples"] += _number(row[column]) or 0.0
      for key, text in row.items():
        m = SOURCE_STALL.match(key)
        reason = m and (m.group(1) or m.group(2))
        if reason and not reason.endswith("_not_issued"):
          site["reasons"][reason] = site["reasons"].get(reason, 0.0) + (_number(text) or 0.0)
    total = sum(s["samples"] for s in sites.values())
    by_opcode: Dict[str, float] = {}
    by_reason: Dict[str, float] = {}
    for s in sites.values():
      op = _opcode(s["source"])
      by_opcode[op] = by_opcode.get(op, 0.0) + s["samples"]
      for reason, v in s["reasons"].items():
        by_reason[reason] = by_reason.get(reason, 0.0) + v
    ranked = sorted(sites.values(), key=lambda s: -s["samples"])[:top]
    summary.append({
        "name": name, "instructions": len(sites), "samples": total,
        "by_opcode": dict(sorted(by_opcode.items(), key=lambda kv: -kv[1])),
        "by_reason": dict(sorted(by_reason.items(), key=lambda kv: -kv[1])),
        "top": [{"address": s["address"], "source": s["source"], "samples": s["samples"],
                 "share": s["samples"] / total if total else 0.0,
                 "reasons": dict(sorted(s["reasons"].items(), key=lambda kv: -kv[1])[:3])}
                for s in ranked if s["samples"] > 0]})
  return summary


def source_markdown(summary: List[dict], top: int = 10) -> str:
  """Per kernel, the instructions where its warps were found most often, and why."""
  lines = []
  for k in summary:
    if "error" in k:
      lines.append(f"{k['name']}: {k['error']}")
      continue
    share = lambda v: f"{100 * v / k['samples']:.0f}%" if k["samples"] else "-"
    lines += ["", f"{k['name']}: {k['samples']:,.0f} samples over {k['instructions']} "
              "instructions; by opcode " + ", ".join(
                  f"{op} {share(v)}" for op, v in list(k["by_opcode"].items())[:6])
              + "; by reason " + ", ".join(
                  f"{r} {share(v)}" for r, v in list(k["by_reason"].items())[:4]),
              "", "| address | instruction | share of samples | reasons |", "|---|---|---|---|"]
    for s in k["top"][:top]:
      reasons = ", ".join(f"{r} {share(v)}" for r, v in s["reasons"].items())
      lines.append(f"| {s['address']} | `{s['source']}` | {100 * s['share']:.1f}% | "
                   f"{reasons or '-'} |")
  return "\n".join(lines) + "\n"


def _run(cmd: List[str], **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _profile(cmd: List[str], env: Dict[str, str], cwd: str) -> "tuple[int, str]":
  """Runs the profiling ``cmd``; its stdout is echoed line by line as it comes (ncu's
  progress per launch: where a stopped run was) and returned, its stderr passed
  through."""
  lines = []
  with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd) as proc:
    for line in proc.stdout:
      lines.append(line)
      sys.stdout.write(line)
      sys.stdout.flush()
  return proc.returncode, "".join(lines)


def main(argv):
  del argv
  ncu = find_ncu(FLAGS.ncu)
  out = os.path.abspath(FLAGS.out)
  os.makedirs(out, exist_ok=True)
  report = os.path.join(out, "ncu")  # ncu adds .ncu-rep
  with tempfile.TemporaryDirectory() as bench_out:
    cmd = ncu_command(ncu, FLAGS.kernels, FLAGS.launch_count, bench_out,
                      shlex.split(FLAGS.benchmark_args), report)
    print("running:", " ".join(shlex.quote(c) for c in cmd), flush=True)
    # No huge-page re-execution of the benchmark (experiments/hugepages.py: a CPU matter);
    # JAX takes the GPU memory it uses, not 75% of it: ncu's replay of a launch keeps a
    # copy of the memory the kernel writes.
    # XLA's GEMM autotuning off: its trial launches of every candidate would each pass
    # through ncu, and the profiled kernels (Pallas, fixed tilings) do not depend on it.
    env = dict(os.environ, L2OJAX_HUGEPAGES="0", XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                "--xla_gpu_autotune_level=0"])))
    if not os.access(env.get("HOME", "/nonexistent"), os.W_OK):
      env["HOME"] = bench_out  # ncu deploys its section files there; unwritable: no report
    returncode, raw = _profile(cmd, env, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
  rep = report + ".ncu-rep"
  if returncode == 0 and os.path.exists(rep):
    raw = _run(import_command(ncu, rep, "raw")).stdout
  launches = parse_raw_csv(raw)
  with open(os.path.join(out, "ncu.csv"), "w") as f:
    f.write(raw)
  if returncode != 0 or not launches:
    raise SystemExit(f"ncu_kernels: ncu exited {returncode} with {len(launches)} "
                     f"launches read (its output: {os.path.join(out, 'ncu.csv')})")
  kernels = summarize(launches)
  page = _run(import_command(ncu, rep, "source")) if os.path.exists(rep) else None
  if page is not None:
    with open(os.path.join(out, "ncu_source.csv"), "w") as f:
      f.write(page.stdout)
  by_kernel = parse_source_csv(page.stdout) if page is not None else {}
  source = summarize_source(by_kernel) if by_kernel else {
      "error": (f"no report file {rep}" if page is None else
                f"ncu's source page exited {page.returncode} with no instruction rows: "
                f"{(page.stderr or page.stdout)[-500:]}")}
  version = _run([ncu, "--version"]).stdout.strip()
  with open(os.path.join(out, "ncu.json"), "w") as f:
    json.dump({"ncu": version.splitlines()[-1] if version else "", "command": cmd,
               "kernels": kernels, "source": source,
               "launches": [{k: v for k, v in l.items() if k != "units"} for l in launches]},
              f, indent=1)
  print(markdown(kernels), end="")
  print(source_markdown(source) if isinstance(source, list) else
        f"\nsource page: {source['error']}\n", end="")


if __name__ == "__main__":
  define_flags()
  app.run(main)
