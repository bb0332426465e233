"""Meta-training over several processes (jax.distributed on the CPU, 2 x 2 devices), with
curriculum and imitation: the same theta as one process on 4 devices, one record, and a
resume across them."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
from jax.flatten_util import ravel_pytree

from l2ojax import checkpoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "multihost_check.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run(nproc, workdir, out, max_seconds=-1.0):
  os.makedirs(out)
  port = str(_free_port())
  env = {**os.environ, "PYTHONPATH": ROOT, "TQDM_DISABLE": "1"}
  procs = [subprocess.Popen([sys.executable, WORKER, str(pid), str(nproc), port, str(workdir),
                             str(out), str(max_seconds)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in range(nproc)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  return [dict(np.load(os.path.join(out, f"theta_{pid}.npz"))) for pid in range(nproc)]


def test_two_processes_train_like_one_write_one_record_and_resume(tmp_path):
  ref = _run(1, tmp_path / "one", tmp_path / "out_one")[0]
  workdir = tmp_path / "two"
  paused = _run(2, workdir, tmp_path / "out_paused", max_seconds=0.0)  # both stop after 1
  assert all(int(r["episodes"]) == 1 and not bool(r["finished"]) for r in paused)
  done = _run(2, workdir, tmp_path / "out_done")  # both resume from the checkpoint they saved
  assert all(int(r["episodes"]) == 4 and bool(r["finished"]) for r in done)
  np.testing.assert_array_equal(done[0]["theta"], done[1]["theta"])
  # the same all-reduced meta-gradients, summed in another order
  np.testing.assert_allclose(done[0]["theta"], ref["theta"], rtol=1e-5, atol=1e-7)
  rows = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["episode"] for r in rows] == [0, 1, 2, 3]  # written once, by the first process
  assert {r["mode"] for r in rows} == {"meta", "imitation"}
  assert sum("val_loss" in r for r in rows) == 2
  calls = [json.loads(l) for l in open(workdir / "calls.jsonl")]
  assert [c["episodes"] for c in calls] == [[0, 1], [1, 4]]
  _, theta, _ = checkpoints.load_theta(str(workdir / "theta.msgpack"))
  np.testing.assert_array_equal(np.asarray(ravel_pytree(theta)[0]), done[0]["theta"])
