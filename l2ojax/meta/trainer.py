"""The outer meta-training loop: episodes of truncated segments, validation,
checkpoints, metrics. Plain Python around jitted steps; nothing retraces per
iteration."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional, Tuple

import chex
import jax
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from l2ojax import checkpoints, models, optimizees
from l2ojax.meta import config as config_lib
from l2ojax.meta import curriculum as curriculum_lib
from l2ojax.meta import imitation as imitation_lib
from l2ojax.meta import metrics as metrics_lib
from l2ojax.meta import sharding
from l2ojax.meta import step as step_lib
from l2ojax.meta import tensorboard


# The launchers' exit status when ``train`` paused: sysexits' EX_TEMPFAIL, "run again".
EXIT_PAUSED = 75


class TrainResult(NamedTuple):
  lopt: Any
  theta: Any             # the final model: the best-validated theta
  best_score: float
  episodes: int
  workdir: str
  finished: bool = True  # False: paused (max_seconds or should_stop); re-running resumes


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


def _float(x) -> float:
  return float(np.asarray(x))


def _log_call(workdir: str, first: int, last: int, seconds: float, finished: bool) -> None:
  """calls.jsonl: one line per call of ``train`` (a run resumed over several calls,
  perhaps on different machines, keeps a record of which did what)."""
  row = {"episodes": [first, last], "seconds": round(seconds, 3), "finished": bool(finished),
         "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
         "jax": jax.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "ended": round(time.time(), 3)}  # unix seconds: the call ran from ended - seconds
  with open(os.path.join(workdir, "calls.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")


def build_curriculum(config: ml_collections.ConfigDict) -> curriculum_lib.Curriculum:
  """The configured schedule; without ``curriculum.enabled``, one stage of
  ``meta.episode_steps`` that never advances nor stops (keep-the-best only)."""
  cl = config.get("curriculum")
  if cl is not None and cl.enabled:
    return curriculum_lib.Curriculum(tuple(int(s) for s in cl.schedule), int(cl.min_num_eval))
  return curriculum_lib.Curriculum((int(config.meta.episode_steps),), None)


class ImitationSettings(NamedTuple):
  teacher: optax.GradientTransformation
  ratios: tuple           # per stage; the last repeats
  k: int
  separate_outer_state: bool


def build_imitation(config: ml_collections.ConfigDict) -> Optional[ImitationSettings]:
  """None unless ``imitation.enabled``; the ratio is per stage with a curriculum,
  the single ``imitation.ratio`` without one."""
  il = config.get("imitation")
  if il is None or not il.enabled:
    return None
  cl = config.get("curriculum")
  ratios = tuple(il.ratios) if (cl is not None and cl.enabled) else (il.ratio,)
  return ImitationSettings(imitation_lib.make_teacher(il.teacher, il.learning_rate), ratios,
                           int(il.get("k", 1)), bool(il.get("separate_outer_state", True)))


@contextlib.contextmanager
def sigterm_requests_stop() -> Iterator[Callable[[], bool]]:
  """Yields ``should_stop`` for ``train``: true once the process got SIGTERM.

  Batch systems and ``timeout`` send SIGTERM some time before they kill; with
  it, the episode under way is finished and checkpointed instead of lost. The
  previous handler is back on exit. Outside the main thread (where no handler
  can be installed) ``should_stop`` stays false.
  """
  received = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield received.is_set
    return
  previous = signal.signal(signal.SIGTERM, lambda *_: received.set())
  try:
    yield received.is_set
  finally:
    signal.signal(signal.SIGTERM, previous)


def _local(tree: chex.ArrayTree) -> chex.ArrayTree:
  """This process's copy of a replicated pytree, on its default device (whatever mesh
  the training ran on, the result is then usable alone)."""
  return jax.tree_util.tree_map(jax.numpy.asarray, checkpoints.host_arrays(tree))


def _run_keys(config: ml_collections.ConfigDict
              ) -> Tuple[chex.PRNGKey, chex.PRNGKey, chex.PRNGKey]:
  """(the training's key, theta's initialisation key, validation's key) of a run."""
  key, k_theta, k_val = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  return key, k_theta, k_val


def initial_theta(config: ml_collections.ConfigDict) -> chex.ArrayTree:
  """The theta a training of ``config`` starts from (its model at ``config.seed``'s draw):
  the reference that shows how far meta-training moved it."""
  return build_model(config).init(_run_keys(config)[1])


def train(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
          max_seconds: Optional[float] = None,
          should_stop: Optional[Callable[[], bool]] = None) -> TrainResult:
  """Meta-trains ``config.model`` on ``config.optimizee``; resumes from ``workdir``.

  Each episode is a meta episode (the learner moves the optimizee; meta-loss
  over its losses) or, with probability ``imitation`` ratio of the stage, an
  imitation episode (the teacher moves it; the learner imitates). Validation
  every ``validation.period`` episodes feeds the curriculum controller, which
  keeps the best, advances stages and ends training. The final model is the
  last theta that improved validation.

  ``max_seconds``: once this much time has passed since the call, the episode
  under way is finished, checkpointed, and the call returns with
  ``finished=False`` (no theta.msgpack); calling again resumes, so a job under
  a batch system's time limit can be split into calls that give, together,
  the same theta as one. ``should_stop``: polled after every episode; true
  pauses the same way (e.g. ``sigterm_requests_stop``).
  """
  started = time.perf_counter()
  if max_seconds is not None and max_seconds < 0:
    raise ValueError(f"train: max_seconds={max_seconds} must be >= 0")
  config_lib.validate(config)  # every field checked before anything is built or compiled
  # Under jax.distributed every process runs this same loop on the same values; the
  # first alone writes the run's record (orbax coordinates the checkpoints itself).
  primary = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if primary:
    with open(os.path.join(workdir, "config.json"), "w") as f:  # what the run was
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  meta, val = config.meta, config.validation
  curriculum = build_curriculum(config)
  imitation = build_imitation(config)
  score_kind = val.get("score", "last")
  optimizee = build_optimizee(config)
  lopt = build_model(config)
  outer_tx = build_outer_optimizer(meta)

  key, k_theta, k_val = _run_keys(config)
  theta = lopt.init(k_theta)
  state = {"theta": theta, "outer_state": outer_tx.init(theta),
           "il_outer_state": outer_tx.init(theta), "key": key, "best_theta": theta}
  cstate = curriculum.init()
  info = {"episode": 0, "skipped_updates": 0, **cstate._asdict()}

  ckpt = checkpoints.CheckpointManager(os.path.join(workdir, "checkpoints"))
  if ckpt.latest_step() is not None:
    state, info = ckpt.restore(state)
    print(f"resumed from episode {info['episode']} (stage {info['stage']}) in {workdir}")
  cstate = curriculum_lib.CurriculumState(
      int(info["stage"]), float(info["best_score"]), int(info["patience"]),
      bool(info["improved"]), bool(info["done"]))
  writer = (metrics_lib.MetricsWriter(os.path.join(workdir, "metrics.jsonl"), info["episode"])
            if primary else None)
  scalars = (tensorboard.EpisodeScalars(os.path.join(workdir, "tensorboard"), info["episode"])
             if primary and config.get("tensorboard", False) else None)
  first_episode = info["episode"]

  # the batch of optimizees split over every device, each unrolling its own rows
  mesh = sharding.make_mesh() if meta.get("shard", False) else None
  init_states = step_lib.make_init_states(lopt, meta.batch_size)
  meta_step = step_lib.make_meta_step(lopt, outer_tx, meta.segment_length, meta.loss,
                                      meta.second_order, meta.get("divergence_bound", 1e3),
                                      meta.get("remat", None) or None,
                                      meta.get("remat_chunk", 0), meta.get("scan_unroll", 1),
                                      mesh=mesh, residual_tape=meta.get("residual_tape", False))
  validate = step_lib.make_validate(lopt, val.num_optimizees)
  if imitation is not None:
    init_il_states = imitation_lib.make_init_imitation_states(lopt, imitation.teacher,
                                                               meta.batch_size)
    il_step = imitation_lib.make_imitation_step(lopt, imitation.teacher, outer_tx,
                                                meta.segment_length, imitation.k, mesh=mesh,
                                                residual_tape=meta.get("residual_tape", False))

  def val_steps(stage: int) -> int:
    if curriculum.min_num_eval is None and val.steps:
      return int(val.steps)
    return curriculum.validation_steps(stage)

  def run_validation(theta, stage: int) -> float:
    return curriculum_lib.score(jax.device_get(validate(theta, k_val, optimizee,
                                                        val_steps(stage))), score_kind)

  theta, outer_state, key = state["theta"], state["outer_state"], state["key"]
  il_outer_state, best_theta = state["il_outer_state"], state["best_theta"]
  if mesh is not None:
    init_states = sharding.sharded_init_states(init_states, mesh)
    if imitation is not None:
      init_il_states = sharding.sharded_init_states(init_il_states, mesh)
    theta, outer_state, il_outer_state, optimizee = sharding.replicate(
        (theta, outer_state, il_outer_state, optimizee), mesh)
  bar = tqdm(total=meta.num_episodes, initial=info["episode"], disable=not progress,
             desc="meta-training", dynamic_ncols=True)
  while not cstate.done and info["episode"] < meta.num_episodes:
    episode, stage = info["episode"], cstate.stage
    steps = curriculum.episode_steps(stage)
    t0 = time.perf_counter()
    key, k_init, k_ep, k_mode = jax.random.split(key, 4)
    imitate = (imitation is not None and
               float(jax.random.uniform(k_mode)) <
               curriculum_lib.stage_value(imitation.ratios, stage))
    seg_keys = jax.random.split(k_ep, steps // meta.segment_length)
    seg_metrics = []
    if imitate:
      states = init_il_states(theta, k_init, optimizee)
      for k_seg in seg_keys:
        if imitation.separate_outer_state:
          theta, il_outer_state, states, m = il_step(theta, il_outer_state, states, k_seg,
                                                     optimizee)
        else:
          theta, outer_state, states, m = il_step(theta, outer_state, states, k_seg, optimizee)
        seg_metrics.append(m)
    else:
      states = init_states(theta, k_init, optimizee)
      for k_seg in seg_keys:
        theta, outer_state, states, m = meta_step(theta, outer_state, states, k_seg, optimizee)
        seg_metrics.append(m)
    seg_metrics = jax.device_get(seg_metrics)  # one host sync per episode
    skipped = int(sum(m["skipped"] for m in seg_metrics))
    info["skipped_updates"] += skipped
    loss_key = "imitation_loss" if imitate else "meta_loss"
    row = {"episode": episode, "stage": stage, "mode": "imitation" if imitate else "meta",
           "episode_steps": steps,
           loss_key: float(np.mean([m[loss_key] for m in seg_metrics])),
           "train_loss": float(np.mean([m["mean_loss"] for m in seg_metrics])),
           "final_loss": _float(seg_metrics[-1]["last_loss"]),
           "skipped_updates": skipped,
           "diverged": int(sum(m.get("diverged", 0) for m in seg_metrics))}
    applied = [float(m["grad_norm"]) for m in seg_metrics if not m["skipped"]]
    if applied:  # the meta-gradients' global norm, mean over the updates applied
      row["meta_grad_norm"] = float(np.mean(applied))
    info["episode"] = episode + 1
    if val.period and info["episode"] % val.period == 0:
      score = run_validation(theta, stage)
      row.update(val_loss=score, val_steps=val_steps(stage))
      cstate, decision = curriculum.observe(cstate, score)
      row["decision"] = decision.value
      if decision == curriculum_lib.Decision.IMPROVED:
        best_theta = theta
        row["improved"] = True
      elif decision == curriculum_lib.Decision.ADVANCE:
        theta = best_theta
        cstate = curriculum.advance(cstate, run_validation(theta, cstate.stage + 1))
        row["rescored"] = cstate.best_score
      elif decision in (curriculum_lib.Decision.STOP, curriculum_lib.Decision.COMPLETE):
        theta = best_theta
    info.update(cstate._asdict())
    row["seconds"] = time.perf_counter() - t0
    if writer is not None:
      writer.write(row)
    if scalars is not None:
      scalars.write(row)
    bar.update(1)
    bar.set_postfix(stage=stage, train_loss=f"{row['train_loss']:.4g}",
                    **({"val": f"{row['val_loss']:.4g}"} if "val_loss" in row else {}))
    finished = cstate.done or info["episode"] >= meta.num_episodes
    out_of_time = not finished and (
        (max_seconds is not None and time.perf_counter() - started >= max_seconds)
        or (should_stop is not None and should_stop()))
    if info["episode"] % config.checkpoint_every == 0 or finished or out_of_time:
      ckpt.save(info["episode"], {"theta": theta, "outer_state": outer_state,
                                  "il_outer_state": il_outer_state, "key": key,
                                  "best_theta": best_theta}, dict(info))
    if out_of_time:
      break
  bar.close()
  ckpt.close()
  if scalars is not None:
    scalars.close()
  finished = cstate.done or info["episode"] >= meta.num_episodes
  if primary and info["episode"] > first_episode:
    _log_call(workdir, first_episode, info["episode"], time.perf_counter() - started, finished)
  best_theta = _local(best_theta)
  if not finished:
    print(f"paused after episode {info['episode']} of {meta.num_episodes}; the same call "
          f"resumes from {workdir}")
    return TrainResult(lopt, best_theta, cstate.best_score, info["episode"], workdir, False)
  if cstate.stage == 0 and not np.isfinite(cstate.best_score):
    # never validated (a later stage always has a best): theta is the model
    best_theta = _local(theta)
  if primary:
    checkpoints.save_theta(os.path.join(workdir, "theta.msgpack"), lopt, best_theta,
                           {"optimizee": config.optimizee.name, "episodes": info["episode"],
                            "stage": cstate.stage, "best_val_loss": cstate.best_score})
  return TrainResult(lopt, best_theta, cstate.best_score, info["episode"], workdir)
