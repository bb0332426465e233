import json
import math

import jax
import numpy as np
import pytest

from experiments.configs import dm_quadratic
from l2ojax import checkpoints
from l2ojax.meta import curriculum as cl
from l2ojax.meta import trainer

D = cl.Decision


def _run(cur, scores, rescores=()):
  """Feeds scripted validation scores; returns the decisions and the final state."""
  state, decisions, rescores = cur.init(), [], list(rescores)
  for s in scores:
    state, d = cur.observe(state, s)
    decisions.append(d)
    if d == D.ADVANCE:
      state = cur.advance(state, rescores.pop(0))
  return decisions, state


def test_validation_length_is_the_next_stage_and_the_last_stage_its_own():
  cur = cl.Curriculum((100, 200, 500))
  assert [cur.validation_steps(i) for i in range(3)] == [200, 500, 500]
  assert [cur.episode_steps(i) for i in range(3)] == [100, 200, 500]


def test_improvement_resets_patience_and_keeps_the_best():
  cur = cl.Curriculum((10, 20), min_num_eval=3)
  decisions, state = _run(cur, [5.0, 6.0, 4.0, 4.5])
  assert decisions == [D.IMPROVED, D.WAIT, D.IMPROVED, D.WAIT]
  assert state == cl.CurriculumState(stage=0, best_score=4.0, patience=1, improved=True,
                                     done=False)


def test_advance_after_min_num_eval_without_improvement_and_rescore():
  cur = cl.Curriculum((10, 20, 30), min_num_eval=3)
  decisions, state = _run(cur, [5.0, 5.0, 7.0, 6.0], rescores=[8.0])
  assert decisions == [D.IMPROVED, D.WAIT, D.WAIT, D.ADVANCE]
  # The new stage starts from the restored best re-scored at its length.
  assert state == cl.CurriculumState(stage=1, best_score=8.0, patience=0, improved=False,
                                     done=False)
  decisions, state = _run(cur, [5.0, 6, 6, 6, 7.9], rescores=[8.0])
  assert decisions[-1] == D.IMPROVED and state.best_score == 7.9 and state.stage == 1


def test_a_stage_that_never_improves_stops_training():
  cur = cl.Curriculum((10, 20, 30), min_num_eval=2)
  decisions, state = _run(cur, [5.0, 6.0, 6.0, 9.0, 9.5], rescores=[8.0])
  assert decisions == [D.IMPROVED, D.WAIT, D.ADVANCE, D.WAIT, D.STOP]
  assert state.done and state.stage == 1 and state.best_score == 8.0
  with pytest.raises(ValueError, match="already done"):
    cur.observe(state, 1.0)


def test_last_stage_completes_instead_of_advancing():
  cur = cl.Curriculum((10, 20), min_num_eval=1)
  decisions, state = _run(cur, [5.0, 6.0, 4.0, 3.0, 3.5], rescores=[4.5])
  assert decisions == [D.IMPROVED, D.ADVANCE, D.IMPROVED, D.IMPROVED, D.COMPLETE]
  assert state.done and state.stage == 1 and state.best_score == 3.0
  with pytest.raises(ValueError, match="last"):
    cur.advance(state._replace(done=False), 1.0)


def test_non_finite_scores_never_improve_and_no_curriculum_never_stops():
  cur = cl.Curriculum((10,), min_num_eval=None)
  decisions, state = _run(cur, [math.nan, math.inf, 3.0] + [4.0] * 50)
  assert decisions[:3] == [D.WAIT, D.WAIT, D.IMPROVED]
  assert set(decisions[3:]) == {D.WAIT} and not state.done and state.best_score == 3.0


def test_scores_and_bad_input():
  losses = np.array([[3.0, 2.0, 1.0], [3.0, 2.0, 3.0]])
  assert cl.score(losses, "last") == 2.0
  assert cl.score(losses, "mean") == pytest.approx(14 / 6)
  assert cl.score(losses, "log_last") == pytest.approx(np.log(3.0) / 2)
  assert cl.score(np.array([[1.0, np.nan]])) == math.inf
  with pytest.raises(ValueError, match="curriculum.score"):
    cl.score(losses, "best")
  with pytest.raises(ValueError, match="shape"):
    cl.score(np.ones(3))
  with pytest.raises(ValueError, match="schedule"):
    cl.Curriculum(())
  assert cl.stage_value((0.0, 0.1, 0.3), 7) == 0.3


def _cl_il_quadratic(episodes):
  c = dm_quadratic.get_config()
  c.meta.batch_size = 4
  c.meta.num_episodes = episodes
  c.validation.period = 2
  c.validation.num_optimizees = 8
  c.checkpoint_every = 3
  c.curriculum.enabled = True
  c.curriculum.schedule = (20, 40, 60)
  c.curriculum.min_num_eval = 1
  c.imitation.enabled = True
  c.imitation.ratios = (0.5,)
  return c


def test_trainer_walks_the_curriculum_and_resumes_identically(tmp_path):
  """Stages and imitation episodes appear in metrics.jsonl as scheduled; a run
  stopped at a checkpoint and resumed ends where an uninterrupted one does."""
  full = trainer.train(_cl_il_quadratic(16), str(tmp_path / "full"), progress=False)
  rows = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
  assert {r["mode"] for r in rows} == {"meta", "imitation"}
  stages = [r["stage"] for r in rows]
  assert stages == sorted(stages) and max(stages) >= 1
  assert all(r["episode_steps"] == (20, 40, 60)[r["stage"]] for r in rows)
  for r in rows:
    if "val_loss" in r:
      assert r["val_steps"] == (40, 60, 60)[r["stage"]]
      if r["decision"] == "advance":
        assert "rescored" in r
  assert all(("imitation_loss" in r) == (r["mode"] == "imitation") for r in rows)
  if full.episodes < 16:  # ended early: only a stop or a completed last stage does that
    assert rows[-1]["decision"] in ("stop", "complete")

  trainer.train(_cl_il_quadratic(6), str(tmp_path / "resumed"), progress=False)
  resumed = trainer.train(_cl_il_quadratic(16), str(tmp_path / "resumed"), progress=False)
  assert resumed.episodes == full.episodes and resumed.best_score == full.best_score
  _, t_full, info_full = checkpoints.load_theta(str(tmp_path / "full" / "theta.msgpack"))
  _, t_res, info_res = checkpoints.load_theta(str(tmp_path / "resumed" / "theta.msgpack"))
  assert info_full["stage"] == info_res["stage"]
  for a, b in zip(jax.tree_util.tree_leaves(t_full), jax.tree_util.tree_leaves(t_res)):
    np.testing.assert_array_equal(a, b)
  rows_res = [json.loads(l) for l in open(tmp_path / "resumed" / "metrics.jsonl")]
  assert [r["episode"] for r in rows_res] == list(range(full.episodes))
  assert [r["mode"] for r in rows_res] == [r["mode"] for r in rows]


def test_trainer_rejects_a_schedule_that_is_not_whole_segments(tmp_path):
  c = _cl_il_quadratic(2)
  c.curriculum.schedule = (20, 50)
  with pytest.raises(ValueError, match="curriculum.schedule"):
    trainer.train(c, str(tmp_path), progress=False)
