"""TensorBoard scalars of a training: the same figures as metrics.jsonl, also across a resume."""
import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from tensorboardX.proto import event_pb2  # the test extra installs it

from l2ojax.meta import metrics, tensorboard, trainer
from tests.helpers.configs import tiny_quadratic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _events(path):
  """The Event protos of one event file (TFRecord framing: length, its CRC, data, its CRC)."""
  events, data = [], open(path, "rb").read()
  at = 0
  while at < len(data):
    (length,) = struct.unpack("<Q", data[at:at + 8])
    events.append(event_pb2.Event.FromString(data[at + 12:at + 12 + length]))
    at += 12 + length + 4
  return events


def _scalars(logdir):
  """tag -> {step: [values]} as TensorBoard shows them: files in the order written, and a
  session (re)start at step s hides what earlier files logged from step s on."""
  files = sorted((_events(p) for p in glob.glob(os.path.join(logdir, "events.out.tfevents.*"))),
                 key=lambda events: events[0].wall_time)
  shown = {}
  for events in files:
    for e in events:
      if e.HasField("session_log") and e.session_log.status == e.session_log.START:
        for steps in shown.values():
          for s in [s for s in steps if s >= e.step]:
            del steps[s]
      for v in e.summary.value:
        shown.setdefault(v.tag, {}).setdefault(e.step, []).append(v.simple_value)
  return shown


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _assert_shows_the_metrics(logdir, rows):
  shown = _scalars(logdir)
  assert all(r["meta_grad_norm"] > 0 for r in rows)  # every episode applied its updates
  for field, tag in (("train_loss", "train/mean_optimizee_loss"), ("stage", "curriculum/stage"),
                     ("val_loss", "validation/score"), ("meta_grad_norm", "train/meta_grad_norm")):
    expected = {r["episode"]: r[field] for r in rows if field in r}
    assert sorted(shown[tag]) == sorted(expected), tag
    for step, values in shown[tag].items():
      assert len(values) == 1, (tag, step, values)
      np.testing.assert_allclose(values[0], expected[step], rtol=1e-6)


def test_training_writes_the_metrics_as_scalars_and_a_resume_hides_the_repeated_episodes(
    tmp_path):
  config = tiny_quadratic(episodes=5, checkpoint_every=2, validation_period=2)
  config.tensorboard = True
  workdir = str(tmp_path)
  trainer.train(config, workdir, progress=False)
  logdir = os.path.join(workdir, "tensorboard")
  rows = _rows(workdir)
  assert [r["episode"] for r in rows] == [0, 1, 2, 3, 4]
  _assert_shows_the_metrics(logdir, rows)
  assert sorted(_scalars(logdir)["validation/score"]) == [1, 3]

  # as if killed after episode 4 (its row and scalars written) before the final checkpoint:
  # the resume starts from episode 4's checkpoint and runs episode 4 again
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "5"]
  shutil.rmtree(os.path.join(workdir, "checkpoints", "5"))
  os.remove(os.path.join(workdir, "theta.msgpack"))
  trainer.train(config, workdir, progress=False)
  rows = _rows(workdir)
  assert [r["episode"] for r in rows] == [0, 1, 2, 3, 4]
  raw = [e.step for p in glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
         for e in _events(p) for v in e.summary.value if v.tag == "train/mean_optimizee_loss"]
  assert sorted(raw) == [0, 1, 2, 3, 4, 4]  # both calls' events are in the files
  _assert_shows_the_metrics(logdir, rows)


def test_a_record_converts_to_the_same_scalars(tmp_path):
  config = tiny_quadratic(episodes=3, checkpoint_every=3, validation_period=1)
  trainer.train(config, str(tmp_path), progress=False)
  assert not os.path.exists(tmp_path / "tensorboard")  # off by default
  rows = _rows(str(tmp_path))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"episode": 3, "train_lo')  # a line cut by a kill is skipped
  out = subprocess.run([sys.executable, "-m", "experiments.tensorboard", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == str(tmp_path / "tensorboard")
  _assert_shows_the_metrics(str(tmp_path / "tensorboard"), rows)


def test_a_folder_without_a_record_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    tensorboard.from_metrics(str(tmp_path))


def test_without_tensorboardx_the_error_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
  config = tiny_quadratic(episodes=1)
  config.tensorboard = True
  with pytest.raises(ImportError, match=r"pip install 'l2ojax\[tensorboard\]'"):
    trainer.train(config, str(tmp_path), progress=False)


def test_the_record_reader_skips_a_line_cut_by_a_kill(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"episode": 0, "train_loss": 1.5}\n{"episode": 1, "train_lo')
  assert metrics.read_rows(str(path)) == [{"episode": 0, "train_loss": 1.5}]
  assert metrics.read_rows(str(tmp_path / "calls.jsonl")) == []  # none yet
