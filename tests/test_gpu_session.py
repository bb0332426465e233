"""The bounded GPU session: stage scheduling, and training state carried between machines."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import chex
import pytest

from experiments import gpu_session
from l2ojax.meta import trainer
from tests.helpers.configs import tiny_quadratic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join("experiments", "results", "gpu_training", "dm", "dm")


def _config():
  return tiny_quadratic(episodes=5, checkpoint_every=4, validation_period=2)


def test_a_run_packed_on_one_machine_resumes_on_another_to_the_same_theta(tmp_path):
  full = trainer.train(_config(), str(tmp_path / "full"), progress=False)
  here, there = tmp_path / "device", tmp_path / "repo"
  for _ in range(3):  # three paused calls: checkpoints 1, 2, 3; orbax keeps 2 and 3
    trainer.train(_config(), str(here / RUN), progress=False, max_seconds=0.0)
  (here / RUN / "dm.log").write_text("a log stays out of the archive")
  assert gpu_session.latest_checkpoints(str(here)) == {str(here / RUN): 3}
  archive = str(tmp_path / "session.tar.gz")
  members = gpu_session.pack(archive, [os.path.dirname(RUN)], root=str(here))
  assert all("/checkpoints/" not in m or "/checkpoints/3/" in m for m in members)
  assert any("/checkpoints/3/" in m for m in members)
  assert not any(m.endswith(".log") for m in members)

  stale = there / RUN / "checkpoints" / "1"  # what the repository held before
  stale.mkdir(parents=True)
  (there / RUN / "metrics.jsonl").write_text("{}\n")
  assert gpu_session.unpack(archive, repo=str(there)) == [RUN]
  assert sorted(os.listdir(there / RUN / "checkpoints")) == ["3"]
  assert len((there / RUN / "metrics.jsonl").read_text().splitlines()) == 3

  res = trainer.train(_config(), str(there / RUN), progress=False)
  assert res.finished and res.episodes == 5
  chex.assert_trees_all_equal(res.theta, full.theta)  # bitwise, on the CPU


def test_unpack_refuses_members_outside_the_sessions_folders(tmp_path):
  evil = tmp_path / "evil.tar.gz"
  payload = tmp_path / "x.txt"
  payload.write_text("x")
  with tarfile.open(evil, "w:gz") as tar:
    tar.add(payload, "../outside.txt")
  with pytest.raises(ValueError, match="outside the repository"):
    gpu_session.unpack(str(evil), repo=str(tmp_path / "repo"))
  with tarfile.open(evil, "w:gz") as tar:
    tar.add(payload, "l2ojax/__init__.py")
  with pytest.raises(ValueError, match="'l2ojax/__init__.py' is neither under bench_results/"):
    gpu_session.unpack(str(evil), repo=str(tmp_path / "repo"))
  assert not (tmp_path / "repo").exists()


def _writes_json(name, minutes=1.0, needs=(), code="pass"):
  """A stage that runs ``code`` and writes {out}/benchmark.json."""
  script = (f"import json, os, sys; {code}; json.dump({{'stage': {name!r}}}, "
            "open(os.path.join(sys.argv[1], 'benchmark.json'), 'w'))")
  return gpu_session.Stage(name, ("-c", script, "{out}"), minutes, needs)


def test_stages_run_in_order_and_skip_what_was_measured_failed_its_check_or_does_not_fit(
    tmp_path):
  stages = [gpu_session.Stage("check", ("-c", "raise SystemExit(3)"), 0.1, bench=False),
            _writes_json("measured"), _writes_json("kernels", needs=("check",)),
            _writes_json("fits", minutes=1.0), _writes_json("too_long", minutes=5.0),
            _writes_json("not_selected")]
  (tmp_path / "bench_results").mkdir()
  (tmp_path / "bench_results" / "h100_measured.json").write_text("{}")
  work = tmp_path / "work"
  work.mkdir()
  now, reported = [0.0], []
  rows = gpu_session.run_stages(
      ["check", "measured", "kernels", "fits", "too_long"], "h100", deadline=360.0,
      train_reserve=120.0, work=str(work), redo=False, stage_list=stages, root=str(tmp_path),
      clock=lambda: now[0], after_each=lambda rows: reported.append(rows[-1]["stage"]))
  assert reported == ["check", "fits"]  # after each stage that ran
  status = {r["stage"]: (r["status"], r.get("why", "")) for r in rows}
  assert list(status) == ["check", "measured", "kernels", "fits", "too_long"]
  assert status["check"][0] == "exit 3"
  assert status["measured"] == ("skipped", "measured before: bench_results/h100_measured.json")
  assert status["kernels"] == ("skipped", "the check failed")
  assert status["fits"][0] == "ok"  # 4 min left after the reserve, 1 expected
  assert status["too_long"] == ("skipped", "4.0 min left, 5 expected")
  kept = json.loads((tmp_path / "bench_results" / "h100_fits.json").read_text())
  assert kept == {"stage": "fits"}
  assert (tmp_path / "bench_results" / "h100_measured.json").read_text() == "{}"

  assert not (tmp_path / "bench_results" / "h100_check.json").exists()

  rows = gpu_session.run_stages(["measured"], "h100", 360.0, 120.0, str(work), redo=True,
                                stage_list=stages, root=str(tmp_path), clock=lambda: now[0])
  assert rows[0]["status"] == "ok" and "stage" in json.loads(
      (tmp_path / "bench_results" / "h100_measured.json").read_text())


def test_a_check_that_passed_is_kept_and_lets_the_next_session_skip_it(tmp_path):
  stages = [gpu_session.Stage("check", ("-c", "print('3 passed')"), 0.1, bench=False),
            _writes_json("kernels", needs=("check",))]
  for session in range(2):
    rows = gpu_session.run_stages(["check", "kernels"], "h200", 600.0, 0.0, str(tmp_path),
                                  redo=False, stage_list=stages, root=str(tmp_path),
                                  clock=lambda: 0.0)
    if session == 0:
      assert [r["status"] for r in rows] == ["ok", "ok"]
      kept = json.loads((tmp_path / "bench_results" / "h200_check.json").read_text())
      assert kept["passed"] and "3 passed" in kept["log_tail"]
    else:
      assert [r["status"] for r in rows] == ["skipped", "skipped"]
      assert all(r["why"].startswith("measured before") for r in rows)
  (tmp_path / "bench_results" / "h200_kernels.json").unlink()
  rows = gpu_session.run_stages(["check", "kernels"], "h200", 600.0, 0.0, str(tmp_path),
                                redo=False, stage_list=stages, root=str(tmp_path),
                                clock=lambda: 0.0)
  assert [r["status"] for r in rows] == ["skipped", "ok"]  # the kept check counts as passed


def test_a_stage_needing_two_checks_runs_only_once_both_passed(tmp_path):
  """Each check gates what needs it: one that failed, or never ran (no time), keeps its
  stages out; one kept from an earlier session counts as passed."""
  def check(name, rc):
    return gpu_session.Stage(name, ("-c", f"raise SystemExit({rc})"), 0.1, bench=False)

  both = _writes_json("both", needs=("check", "check_mlp"))
  lstm_only = _writes_json("lstm_only", needs=("check",))
  run = lambda stages, selected: {r["stage"]: (r["status"], r.get("why", "")) for r in (
      gpu_session.run_stages(selected, "h100", 600.0, 0.0, str(tmp_path), redo=False,
                             stage_list=stages, root=str(tmp_path), clock=lambda: 0.0))}
  status = run([check("check", 0), check("check_mlp", 1), both, lstm_only],
               ["check", "check_mlp", "both", "lstm_only"])
  assert status["both"] == ("skipped", "the check_mlp failed")
  assert status["lstm_only"][0] == "ok"
  status = run([check("check_mlp", 0), both], ["both"])  # check_mlp not selected: never ran
  assert status["both"] == ("skipped", "the check_mlp has not passed")
  status = run([check("check_mlp", 0), both], ["check_mlp", "both"])
  assert status["check_mlp"][0] == "ok" and status["both"][0] == "ok"


def test_a_stage_past_its_time_is_stopped(tmp_path):
  stages = [_writes_json("hangs", minutes=0.0, code="import time; time.sleep(60)")]
  rows = gpu_session.run_stages(["hangs"], "h100", deadline=2.0, train_reserve=0.0,
                                work=str(tmp_path), redo=False, stage_list=stages,
                                root=str(tmp_path), clock=lambda: 0.0)
  assert rows[0]["status"] == "exit 124"
  assert not (tmp_path / "bench_results").exists()


def test_a_stage_far_past_its_expected_minutes_is_stopped_and_the_next_runs(tmp_path,
                                                                           monkeypatch):
  monkeypatch.setattr(gpu_session, "STAGE_OVERRUN", 0.05)  # 0.05 x 1 min: 3 s
  stages = [_writes_json("hangs", minutes=1.0, code="import time; time.sleep(60)"),
            _writes_json("next", minutes=1.0)]
  t0 = time.monotonic()
  rows = gpu_session.run_stages(["hangs", "next"], "h100", deadline=time.monotonic() + 600.0,
                                train_reserve=0.0, work=str(tmp_path), redo=False,
                                stage_list=stages, root=str(tmp_path))
  assert [r["status"] for r in rows] == ["exit 124", "ok"]
  assert time.monotonic() - t0 < 50.0  # not the 60 s the first one asked for


def test_trainings_run_at_once_and_a_paused_one_reads_as_resumable(tmp_path, monkeypatch):
  monkeypatch.setattr(gpu_session, "TRAIN_STOP_SECONDS", 2.0)
  pid_file = tmp_path / "child.pid"
  # a training that ignores SIGTERM (one still compiling polls for it only later), and its child
  stubborn = tmp_path / "stubborn.py"
  stubborn.write_text(
      "import os, signal, subprocess, sys, time\n"
      "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
      "if sys.argv[1:] == ['child']:\n"
      f"  open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
      "else:\n"
      "  subprocess.Popen([sys.executable, __file__, 'child'])\n"
      "time.sleep(120)\n")
  commands = {"dm": ["-c", "raise SystemExit(75)"], "scale": ["-c", "pass"],
              "slow": ["-c", "import time; time.sleep(60)"], "stubborn": [str(stubborn)]}
  rows = gpu_session.run_trainings(commands, time.monotonic() + 5.0, work=str(tmp_path))
  status = {r["stage"]: r["status"] for r in rows}
  assert status["train_dm"] == "paused (resumable)"
  assert status["train_scale"] == "finished"
  assert status["train_slow"] == "exit -15"  # SIGTERM: a training would checkpoint and exit
  assert status["train_stubborn"] == "exit -9"
  assert max(r["seconds"] for r in rows) < 30
  child = int(pid_file.read_text())
  time.sleep(0.5)
  assert not _running(child)  # killed with its group, not left writing into the runs


def _running(pid: int) -> bool:
  try:  # a killed orphan may stay a zombie until its new parent reaps it
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_training_commands_resume_the_repositorys_runs_with_the_data_and_time_given():
  cmds = gpu_session.train_commands(6.5, "mnist10k.npz", ["seed=1"])
  assert set(cmds) == {"dm", "scale"}
  dm, scale = cmds["dm"], cmds["scale"]
  assert dm[:3] == ["-m", "experiments.ablation", "--family=dm"]
  assert f"--workdir={os.path.join(gpu_session.TRAIN_DIR, 'dm')}" in dm
  assert "--processes=5" in dm and "--max_minutes=6.50" in dm
  assert "--override=meta.scan_unroll=20" in dm and "--override=meta.scan_unroll=20" not in scale
  assert "--override=model.options.lstm_kernel=xla" in dm
  assert not any("lstm_kernel" in a for a in scale)  # L2O-Scale has no LSTM stack option
  assert "--override=model.options.lstm_kernel=pallas" in gpu_session.train_commands(
      1.0, "", [], lstm_kernel="pallas")["dm"]
  assert not any("optimizee.options.kernel" in a for a in dm + scale)
  fused = gpu_session.train_commands(1.0, "", [], optimizee_kernel="pallas")
  for cmd in fused.values():  # every family trains on the same MLP
    assert "--override=optimizee.options.kernel=pallas" in cmd
  alone = gpu_session.train_commands(1.0, "", [], families=["scale"])
  assert list(alone) == ["scale"] and alone["scale"] == gpu_session.train_commands(
      1.0, "", [])["scale"]
  for families in (["scale", "rnnprop"], []):
    with pytest.raises(ValueError, match="--train_families"):
      gpu_session.train_commands(1.0, "", [], families=families)
  for cmd in (dm, scale):
    assert "--override=seed=1" in cmd
    assert f"--override=data.path={os.path.abspath('mnist10k.npz')}" in cmd


@pytest.mark.parametrize("smi,short", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"),
                                       ("NVIDIA A100-SXM4-40GB", "a100"),
                                       ("NVIDIA GeForce RTX 4090", "nvidia_geforce_rtx_4090")])
def test_short_gpu_names(smi, short):
  assert gpu_session.short_gpu_name(smi) == short


@pytest.mark.parametrize("args,message", [
    (["--stages=check,bogus"], "--stages: unknown ['bogus']"),
    (["--stages=train"], "--data_path: the trainings need an MNIST .npz"),
    (["--stages=train", "--data_path=/no/such.npz"], "--data_path='/no/such.npz' is not a file"),
    (["--stages=train", "--train_families=dm,l2o"], "--train_families=dm,l2o: unknown ['l2o']")])
def test_bad_flags_are_named(args, message, tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.gpu_session", *args,
                        f"--out={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0 and message in out.stderr + out.stdout


def test_a_session_without_a_gpu_fails_its_check_and_reports_it(tmp_path):
  out = subprocess.run([sys.executable, "-m", "experiments.gpu_session", "--stages=check",
                        "--gpu=nogpu", f"--out={tmp_path}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  report = (tmp_path / "session.md").read_text()
  assert "| check | exit 1 |" in report and "check: no GPU (jax backend cpu)" in report
  assert sorted(os.listdir(tmp_path)) == ["logs.tar.gz", "session.md", "session.tar.gz"]
  with tarfile.open(tmp_path / "session.tar.gz") as tar:
    assert tar.getnames() == []  # nothing kept: a failed check records nothing
  with tarfile.open(tmp_path / "logs.tar.gz") as tar:
    assert "logs/check.log" in tar.getnames()
  assert not os.path.exists(os.path.join(ROOT, "bench_results", "nogpu_check.json"))


def _passed(root, gpu, check):
  """A kept record of ``check`` having passed on ``gpu`` for the code now under ``root``."""
  stage = next(st for st in gpu_session.STAGES if st.name == check)
  path = root / gpu_session.BENCH_DIR / f"{gpu}_{check}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"passed": True, "sources": gpu_session.sources_digest(
      str(root), stage.sources)}))


def test_the_trainings_use_a_fused_kernel_only_once_checked_and_timed_faster(tmp_path):
  kept = tmp_path / gpu_session.BENCH_DIR
  kept.mkdir()

  def bench(stage, steps_per_s):
    rows = [{"workload": "W1", "model": "dm", "B": b, "steps_per_s": steps_per_s * b}
            for b in (1, 8, 64)] + [{"workload": "W2", "model": "dm"}]
    (kept / f"h100_{stage}.json").write_text(json.dumps({"rows": rows}))

  assert gpu_session.training_kernel(str(tmp_path), "h100") == "xla"  # not checked
  _passed(tmp_path, "h100", "check")
  assert gpu_session.training_kernel(str(tmp_path), "h100") == "xla"  # not timed
  bench("dm_pallas", 900.0)
  assert gpu_session.training_kernel(str(tmp_path), "h100") == "xla"  # XLA's not measured
  bench("dm_xla_torch", 1000.0)
  assert gpu_session.training_kernel(str(tmp_path), "h100") == "xla"
  bench("dm_pallas", 1100.0)
  assert gpu_session.training_kernel(str(tmp_path), "h100") == "pallas"
  assert gpu_session.training_kernel(str(tmp_path), "h200") == "xla"  # another GPU's check
  bench("dm_loads", 950.0)  # the fused kernels' newer timing counts, not dm_pallas's
  assert gpu_session.training_kernel(str(tmp_path), "h100") == "xla"
  (kept / "h100_check.json").write_text('{"passed": true}')  # passed, for other code
  bench("dm_loads", 1100.0)
  assert gpu_session.training_kernel(str(tmp_path), "h100") == "xla"

  # the MLP's kernel: its own check, then W1 with it (dm_fused_mlp) against dm_pallas
  bench("dm_pallas", 1000.0)
  bench("dm_fused_mlp", 1100.0)
  assert gpu_session.training_optimizee_kernel(str(tmp_path), "h100") == "xla"  # not checked
  _passed(tmp_path, "h100", "check_mlp")
  assert gpu_session.training_optimizee_kernel(str(tmp_path), "h100") == "pallas"
  bench("dm_fused_mlp", 1010.0)  # faster by less than the medians' spread: a tie
  assert gpu_session.training_optimizee_kernel(str(tmp_path), "h100") == "xla"
  bench("dm_fused_mlp", 990.0)
  assert gpu_session.training_optimizee_kernel(str(tmp_path), "h100") == "xla"


def test_the_trainings_take_an_exact_lever_only_once_checked_and_timed_faster(tmp_path):
  kept = tmp_path / gpu_session.BENCH_DIR
  kept.mkdir()

  def bench(stage, steps_per_s):
    rows = [{"workload": "W1", "model": "dm", "B": b, "steps_per_s": steps_per_s * b}
            for b in (8, 64)]
    (kept / f"h100_{stage}.json").write_text(json.dumps({"rows": rows}))

  exp2, tape = "--kernel_constant=lstm_kernel.EXP2_TANH=1", "--override=meta.residual_tape=true"
  levers = lambda: gpu_session.training_levers(str(tmp_path), "h100")
  bench("tape_base", 1000.0)
  bench("exp2_tanh", 1300.0)
  bench("tape", 1200.0)
  assert levers() == []  # no check passed
  _passed(tmp_path, "h100", "check")
  assert levers() == []  # nor their own checks
  _passed(tmp_path, "h100", "check_exp2")
  assert levers() == [exp2]
  _passed(tmp_path, "h100", "check_tape")
  assert levers() == [exp2, tape]
  bench("tape", 1010.0)  # within the medians' spread: a tie
  assert levers() == [exp2]
  bench("exp2_tanh", 900.0)
  assert levers() == []
  assert gpu_session.training_levers(str(tmp_path), "h200") == []  # another GPU's records
  # the forward kernel's loop: 3 programs per multiprocessor against tape_base, or with
  # the tape (its registers) 2 against tape, each once check_fwd_loop passed
  loop3, loop2 = (f"--kernel_constant=lstm_kernel.FORWARD_PROGRAMS_PER_CORE={k}" for k in (3, 2))
  bench("fwd_loop", 1100.0)
  bench("fwd_loop_tape", 1300.0)
  assert levers() == []
  _passed(tmp_path, "h100", "check_fwd_loop")
  assert levers() == [loop3]
  bench("tape", 1200.0)
  assert levers() == [tape, loop2]
  bench("fwd_loop_tape", 1210.0)  # a tie with tape
  assert levers() == [tape]
  bench("tape", 900.0)
  assert levers() == [loop3]

  # L2O-DM's command takes them with the fused kernels only
  fused = gpu_session.train_commands(1.0, "", [], lstm_kernel="pallas", levers=[exp2, tape])
  assert exp2 in fused["dm"] and tape in fused["dm"]
  assert exp2 not in fused["scale"] and tape not in fused["scale"]
  xla = gpu_session.train_commands(1.0, "", [], lstm_kernel="xla", levers=[exp2, tape])
  assert exp2 not in xla["dm"] and tape not in xla["dm"]


def test_a_kept_check_runs_again_once_its_code_changed_not_its_comments(tmp_path):
  """A check passed for the kernels' code as it was: after a change to that code its
  record no longer counts (the stages needing it wait for it to pass again); a change to
  comments, docstrings or blank lines alone leaves it standing."""
  source = tmp_path / "kernel.py"
  source.write_text('"""A kernel."""\nSIZE = 64  # rows\n\ndef f(x):\n  """Doubles."""\n'
                    '  return 2 * x  # one product\n')
  stages = [gpu_session.Stage("check", ("-c", "print('1 passed')"), 0.1, bench=False,
                              sources=("kernel.py",)),
            _writes_json("kernels", needs=("check",))]
  run = lambda: {r["stage"]: (r["status"], r.get("why", "")) for r in gpu_session.run_stages(
      ["check", "kernels"], "h100", 600.0, 0.0, str(tmp_path), redo=False, stage_list=stages,
      root=str(tmp_path), clock=lambda: 0.0)}
  assert [v[0] for v in run().values()] == ["ok", "ok"]
  record = json.loads((tmp_path / "bench_results" / "h100_check.json").read_text())
  assert record["sources"] == gpu_session.sources_digest(str(tmp_path), ["kernel.py"])
  assert gpu_session.check_passed(str(tmp_path), "h100", "check", stages)

  source.write_text('"""A kernel, reworded."""\n\nSIZE = 64  # rows per block\n\n'
                    'def f(x):\n  """Twice x."""\n\n  return 2 * x\n')
  assert gpu_session.check_passed(str(tmp_path), "h100", "check", stages)
  (tmp_path / "bench_results" / "h100_kernels.json").unlink()
  assert run() == {"check": ("skipped", "measured before: bench_results/h100_check.json"),
                   "kernels": ("ok", "")}

  source.write_text(source.read_text().replace("SIZE = 64", "SIZE = 128"))
  assert not gpu_session.check_passed(str(tmp_path), "h100", "check", stages)
  stages[0] = dataclasses.replace(stages[0], argv=("-c", "raise SystemExit(1)"))
  (tmp_path / "bench_results" / "h100_kernels.json").unlink()
  status = run()
  assert status["check"][0] == "exit 1"  # ran again, and failed
  assert status["kernels"] == ("skipped", "the check failed")


def _fake_mps_control(tmp_path, monkeypatch):
  """An nvidia-cuda-mps-control on PATH that records how it was called."""
  calls = tmp_path / "calls.txt"
  control = tmp_path / "bin" / gpu_session.MPS_CONTROL
  control.parent.mkdir()
  control.write_text(f"#!{sys.executable}\n"
                     "import os, sys\n"
                     f"with open({str(calls)!r}, 'a') as f:\n"
                     "  f.write(' '.join(sys.argv[1:] or [sys.stdin.read().strip()]) + ' '\n"
                     "          + os.environ['CUDA_MPS_PIPE_DIRECTORY'] + '\\n')\n")
  control.chmod(0o755)
  monkeypatch.setenv("PATH", f"{control.parent}{os.pathsep}{os.environ['PATH']}")
  return calls


def test_mps_is_started_for_the_trainings_and_stopped_after(tmp_path, monkeypatch):
  calls = _fake_mps_control(tmp_path, monkeypatch)
  env = gpu_session.start_mps(str(tmp_path), probe=("-c", "print(3.0)"))
  assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(tmp_path / "mps_pipe")
  rows = gpu_session.run_trainings(
      {"dm": ["-c", "import os; assert os.environ['CUDA_MPS_PIPE_DIRECTORY']"]},
      time.monotonic() + 30.0, str(tmp_path), env)
  assert rows[0]["status"] == "finished"  # the trainings see the service's variables
  gpu_session.stop_mps(env)
  pipe = str(tmp_path / "mps_pipe")
  assert calls.read_text().splitlines() == [f"-d {pipe}", f"quit {pipe}"]


def test_mps_is_stopped_and_left_out_where_a_jax_client_fails_under_it(tmp_path, monkeypatch):
  calls = _fake_mps_control(tmp_path, monkeypatch)
  assert gpu_session.start_mps(str(tmp_path), probe=("-c", "raise SystemExit(1)")) is None
  assert [l.split()[0] for l in calls.read_text().splitlines()] == ["-d", "quit"]
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))
  assert gpu_session.start_mps(str(tmp_path)) is None  # not installed


def test_the_plan_names_what_is_done_and_how_far_each_training_got(tmp_path):
  _passed(tmp_path, "h100", "check")
  (tmp_path / "bench_results" / "h100_check_mlp.json").write_text('{"passed": true}')
  runs = tmp_path / gpu_session.TRAIN_DIR / "dm"
  for step in (50, 100):
    (runs / "dm" / "checkpoints" / str(step)).mkdir(parents=True)
    (runs / "dm" / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").write_text("{}")
  (runs / "dm" / "checkpoints" / "150.orbax-checkpoint-tmp-1").mkdir()  # a save cut short
  (runs / "dm_cl").mkdir()
  (runs / "dm_cl" / "theta.msgpack").write_bytes(b"")
  text = gpu_session.plan(["check", "check_mlp", "dm_pallas", "train"], "h100", redo=False,
                          root=str(tmp_path))
  assert text.splitlines() == [
      "GPU h100:",
      "  check         done: bench_results/h100_check.json (2.5 min expected)",
      "  check_mlp     to run again: its code changed since it passed (1 min expected)",
      "  dm_pallas     to run (2 min expected)",
      f"  train         L2O-DM with lstm_kernel=xla, the MLP's kernel xla, pallas if "
      f"check_mlp passes and it is timed faster; runs in "
      f"{gpu_session.TRAIN_DIR}:",
      "    dm: dm (episode 100), dm_cl (episode 0, done)",
      "    scale: not started",
      f"    compile cache: 0 programs in {gpu_session.COMPILE_CACHE}/h100"]
  (tmp_path / gpu_session.COMPILE_CACHE / "h100").mkdir(parents=True)
  _entry(tmp_path / gpu_session.COMPILE_CACHE / "h100", "jit_meta_step-1", 10, used=1)
  assert (f"    compile cache: 1 programs in {gpu_session.COMPILE_CACHE}/h100 (carry it along)"
          in gpu_session.plan(["train"], "h100", False, str(tmp_path)).splitlines())
  text = gpu_session.plan(["check", "check_mlp", "train"], "h200", redo=False,
                          root=str(tmp_path))
  assert ("lstm_kernel=xla, pallas if the check passes and it is timed faster, the MLP's "
          "kernel xla, pallas if check_mlp passes and it is timed faster;") in text
  bench = tmp_path / "bench_results"
  _passed(tmp_path, "h200", "check_mlp")
  assert "the MLP's kernel xla;" in gpu_session.plan(["train"], "h200", False, str(tmp_path))
  for stage, speed in (("dm_pallas", 1000.0), ("dm_fused_mlp", 1200.0)):
    (bench / f"h200_{stage}.json").write_text(json.dumps({"rows": [
        {"workload": "W1", "model": "dm", "B": 8, "steps_per_s": speed}]}))
  assert "the MLP's kernel pallas;" in gpu_session.plan(["train"], "h200", False, str(tmp_path))


def test_the_checks_select_the_gpu_tests_of_their_kernels(tmp_path):
  """Each check's pytest selection, collected here (the GPU tests are skipped, not left
  out, without a GPU): check has every compiled-kernel test of the LSTM kernels but the
  tanh.approx one, which check_tanh has alone, and EXP2_TANH's three, which check_exp2 has
  alone, so that their failure keeps out only what needs them; check_mlp has the MLP
  kernel's."""
  def collected(name):
    stage = next(st for st in gpu_session.STAGES if st.name == name)
    select, path = re.search(r"'-k', '([^']*)',\s*'([^']*)'", stage.argv[1]).groups()
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p",
                           "no:cacheprovider", "-k", select, path], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    return [l.split("::", 1)[1] for l in proc.stdout.splitlines() if "::" in l]

  check, tanh, mlp = collected("check"), collected("check_tanh"), collected("check_mlp")
  exp2 = collected("check_exp2")
  assert "test_fused_kernel_on_gpu[dm_approx_tanh]" in tanh and len(tanh) == 1
  assert set(exp2) == {"test_fused_kernel_on_gpu[dm_exp2_tanh]",
                       "test_fused_kernel_on_gpu[dm_exp2_tanh_keep_lower_gates]",
                       "test_exp2_tanh_on_gpu_is_tanh_to_1e6"}
  assert "test_fused_kernel_on_gpu[dm]" in check and "test_kernel_lowers_for_gpu" in check
  assert not set(check) & set(tanh) and not set(check) & set(exp2)
  assert mlp and all("gpu" in t for t in mlp)


def _entry(folder, key, size, used=None, written=None):
  (folder / f"{key}-cache").write_bytes(b"x" * size)
  if used is not None:
    (folder / f"{key}-atime").write_bytes(int(used).to_bytes(8, "little"))
  if written is not None:
    os.utime(folder / f"{key}-cache", ns=(written, written))


def test_the_compile_cache_comes_back_most_recently_used_first_within_its_limit(tmp_path):
  device, repo = tmp_path / "device", tmp_path / "repo"
  folder = device / gpu_session.COMPILE_CACHE / "h200"
  folder.mkdir(parents=True)
  now = time.time_ns()
  _entry(folder, "used_now", 1000, used=now)
  _entry(folder, "written_long_ago_used_now", 1000, used=now - 1, written=now - 10**12)
  _entry(folder, "stale", 1000, used=now - 10**12)
  _entry(folder, "no_use_recorded", 1000, written=now - 10**6)  # jax without filelock
  (folder / "stale-atime").write_bytes((now - 10**12).to_bytes(8, "little"))
  archive = str(tmp_path / gpu_session.COMPILE_CACHE_ARCHIVE)
  # room for three entries: the stale one stays behind
  kept = gpu_session.pack_compile_cache(archive, "h200", root=str(device), limit=3 * 1008)
  assert kept == ["used_now", "written_long_ago_used_now", "no_use_recorded"]
  assert gpu_session.pack_compile_cache(archive, "h100", root=str(device)) == []

  gpu_session.pack_compile_cache(archive, "h200", root=str(device), limit=3 * 1008)
  members = gpu_session.unpack_compile_cache(archive, repo=str(repo))
  assert len(members) == 5  # three entries, two with their use times
  there = repo / gpu_session.COMPILE_CACHE / "h200"
  assert sorted(os.listdir(there)) == sorted(m.split("/")[1] for m in members)
  assert (there / "used_now-cache").read_bytes() == b"x" * 1000


@pytest.mark.parametrize("name", ["../h200/a-cache", "h200/sub/a-cache", "h200/a.py", "a-cache"])
def test_unpacking_a_compile_cache_refuses_what_is_not_an_entry(tmp_path, name):
  payload = tmp_path / "x"
  payload.write_bytes(b"x")
  archive = tmp_path / "cache.tar"
  with tarfile.open(archive, "w") as tar:
    tar.add(payload, name)
  with pytest.raises(ValueError, match="not a cache entry"):
    gpu_session.unpack_compile_cache(str(archive), repo=str(tmp_path / "repo"))
  assert not (tmp_path / "repo").exists()


def test_a_training_started_with_the_compile_cache_reads_what_an_earlier_one_compiled(tmp_path):
  env = {**os.environ, **gpu_session.compile_cache_env(str(tmp_path), "cpu"),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_LOG_COMPILES": "1"}
  assert env["JAX_COMPILATION_CACHE_DIR"] == str(tmp_path / gpu_session.COMPILE_CACHE / "cpu")

  def train(workdir):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path / workdir}",
         "--config=experiments/configs/dm_quadratic.py", "--config.meta.num_episodes=1", "--config.meta.episode_steps=20",
         "--config.meta.batch_size=2", "--config.eval.num_optimizees=2",
         "--config.eval.steps=5"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return re.findall(r"Persistent compilation cache hit for '(\w+)'", out.stderr)

  assert "jit_meta_step" not in train("first")
  assert os.listdir(env["JAX_COMPILATION_CACHE_DIR"])
  assert "jit_meta_step" in train("second")
