"""The outer meta-training loop: episodes of truncated segments, validation,
checkpoints, metrics. Plain Python around jitted steps; nothing retraces per
iteration."""
from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from l2ojax import checkpoints, models, optimizees
from l2ojax.meta import step as step_lib


class TrainResult(NamedTuple):
  lopt: Any
  theta: Any             # the final model: the best-validated theta
  best_score: float
  episodes: int
  workdir: str


def build_optimizee(config: ml_collections.ConfigDict):
  options = dict(config.optimizee.get("options", {}) or {})
  if optimizees.uses_data(config.optimizee.name):
    d = config.data
    options.update(source=d.source, path=d.path, split=d.split, data_dir=d.get("data_dir", ""))
  return optimizees.get(config.optimizee.name, **options)


def build_model(config: ml_collections.ConfigDict):
  return models.get(config.model.name, **dict(config.model.get("options", {}) or {}))


def build_outer_optimizer(meta: ml_collections.ConfigDict) -> optax.GradientTransformation:
  opts = {"adam": optax.adam, "rmsprop": optax.rmsprop, "sgd": optax.sgd}
  name = meta.get("optimizer", "adam")
  if name not in opts:
    raise ValueError(f"meta.optimizer={name!r}; allowed: {sorted(opts)}")
  parts = []
  if meta.get("zero_nans", False):  # L2O-Scale's: non-finite entries of the meta-gradient -> 0
    parts.append(optax.zero_nans())
  if meta.get("clip_value", 0.0):    # L2O-Scale's: elementwise clip (1e4)
    parts.append(optax.clip(meta.clip_value))
  if meta.get("clip_global_norm", 0.0):
    parts.append(optax.clip_by_global_norm(meta.clip_global_norm))
  parts.append(opts[name](meta.learning_rate))
  return optax.chain(*parts)


class MetricsWriter:
  """metrics.jsonl: one JSON object per episode; truncated on resume so that a
  restarted run does not repeat the episodes after its last checkpoint."""

  def __init__(self, path: str, resume_episode: int):
    self.path = path
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            row = json.loads(line)
          except json.JSONDecodeError:  # a line cut by a kill
            continue
          if row.get("episode", -1) < resume_episode:
            kept.append(line if line.endswith("\n") else line + "\n")
    with open(path, "w") as f:
      f.writelines(kept)

  def write(self, row: Dict[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")


def _float(x) -> float:
  return float(np.asarray(x))


def train(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> TrainResult:
  """Meta-trains ``config.model`` on ``config.optimizee``; resumes from ``workdir``."""
  os.makedirs(workdir, exist_ok=True)
  meta, val = config.meta, config.validation
  if meta.episode_steps % meta.segment_length:
    raise ValueError(f"meta.episode_steps={meta.episode_steps} must be a multiple of "
                     f"meta.segment_length={meta.segment_length}")
  optimizee = build_optimizee(config)
  lopt = build_model(config)
  outer_tx = build_outer_optimizer(meta)

  key = jax.random.PRNGKey(config.seed)
  key, k_theta, k_val = jax.random.split(key, 3)
  theta = lopt.init(k_theta)
  state = {"theta": theta, "outer_state": outer_tx.init(theta), "key": key,
           "best_theta": theta}
  info = {"episode": 0, "best_score": float("inf"), "skipped_updates": 0}

  ckpt = checkpoints.CheckpointManager(os.path.join(workdir, "checkpoints"))
  if ckpt.latest_step() is not None:
    state, info = ckpt.restore(state)
    print(f"resumed from episode {info['episode']} in {workdir}")
  writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), info["episode"])

  init_states = step_lib.make_init_states(lopt, meta.batch_size)
  meta_step = step_lib.make_meta_step(lopt, outer_tx, meta.segment_length, meta.loss,
                                      meta.second_order)
  validate = step_lib.make_validate(lopt, val.num_optimizees)
  val_steps = val.steps or meta.episode_steps
  num_segments = meta.episode_steps // meta.segment_length

  theta, outer_state, key = state["theta"], state["outer_state"], state["key"]
  best_theta = state["best_theta"]
  bar = tqdm(total=meta.num_episodes, initial=info["episode"], disable=not progress,
             desc="meta-training", dynamic_ncols=True)
  while info["episode"] < meta.num_episodes:
    episode = info["episode"]
    t0 = time.perf_counter()
    key, k_init, k_ep = jax.random.split(key, 3)
    states = init_states(theta, k_init, optimizee)
    seg_metrics = []
    for k_seg in jax.random.split(k_ep, num_segments):
      theta, outer_state, states, m = meta_step(theta, outer_state, states, k_seg, optimizee)
      seg_metrics.append(m)
    seg_metrics = jax.device_get(seg_metrics)  # one host sync per episode
    skipped = int(sum(m["skipped"] for m in seg_metrics))
    info["skipped_updates"] += skipped
    row = {"episode": episode, "stage": 0, "mode": "meta",
           "episode_steps": meta.episode_steps,
           "meta_loss": float(np.mean([m["meta_loss"] for m in seg_metrics])),
           "train_loss": float(np.mean([m["mean_loss"] for m in seg_metrics])),
           "final_loss": _float(seg_metrics[-1]["last_loss"]),
           "skipped_updates": skipped}
    info["episode"] = episode + 1
    if val.period and info["episode"] % val.period == 0:
      losses = validate(theta, k_val, optimizee, val_steps)
      score = _float(jnp.mean(losses[:, -1]))
      row["val_loss"] = score
      if np.isfinite(score) and score < info["best_score"]:
        info["best_score"], best_theta = score, theta
        row["improved"] = True
    row["seconds"] = time.perf_counter() - t0
    writer.write(row)
    bar.update(1)
    bar.set_postfix(meta_loss=f"{row['meta_loss']:.4g}", train_loss=f"{row['train_loss']:.4g}",
                    **({"val": f"{row['val_loss']:.4g}"} if "val_loss" in row else {}))
    if info["episode"] % config.checkpoint_every == 0 or info["episode"] == meta.num_episodes:
      ckpt.save(info["episode"], {"theta": theta, "outer_state": outer_state, "key": key,
                                  "best_theta": best_theta}, dict(info))
  bar.close()
  ckpt.close()
  if not np.isfinite(info["best_score"]):  # never validated: the final theta is the model
    best_theta = theta
  checkpoints.save_theta(os.path.join(workdir, "theta.msgpack"), lopt, best_theta,
                         {"optimizee": config.optimizee.name, "episodes": info["episode"],
                          "best_val_loss": info["best_score"]})
  return TrainResult(lopt, best_theta, info["best_score"], info["episode"], workdir)
