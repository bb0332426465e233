"""A training's record: ``metrics.jsonl``, one JSON object per episode."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Tuple


def _lines(path: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
  """(line, row) of each complete line of a JSON-lines file; none if it does not exist."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:  # a line cut by a kill (or blank)
        continue
      yield line, row


def read_rows(path: str) -> List[Dict[str, Any]]:
  """The rows of a JSON-lines record (``metrics.jsonl``, ``calls.jsonl``), skipping a
  line cut by a kill; [] if there is none."""
  return [row for _, row in _lines(path)]


class MetricsWriter:
  """metrics.jsonl: one JSON object per episode; truncated on resume so that a
  restarted run does not repeat the episodes after its last checkpoint."""

  def __init__(self, path: str, resume_episode: int):
    self.path = path
    kept = [line if line.endswith("\n") else line + "\n"
            for line, row in _lines(path) if row.get("episode", -1) < resume_episode]
    with open(path, "w") as f:
      f.writelines(kept)

  def write(self, row: Dict[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
