"""Runs experiments.train, but SIGKILLs itself inside the N-th checkpoint write.

usage: python -m tests.helpers.train_killed_mid_save N [train flags...]
"""
import os
import signal
import sys

import orbax.checkpoint as ocp

from experiments import train

_KILL_AT = int(sys.argv.pop(1))
_calls = {"n": 0}
_handler = ocp.handlers.JsonCheckpointHandler  # writes the metadata item of each checkpoint


def _patch(name):
  original = getattr(_handler, name)

  def save(self, *args, **kwargs):
    _calls["n"] += 1
    if _calls["n"] == _KILL_AT:  # the state item may be on disk already; this one is not
      os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args, **kwargs)

  setattr(_handler, name, save)


for _name in ("async_save", "save"):
  if hasattr(_handler, _name):
    _patch(_name)

if __name__ == "__main__":
  from absl import app
  train.define_flags()
  app.run(train.main)
