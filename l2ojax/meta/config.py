"""Every meta-training config field, its default, and the checks run before any compilation.

``default_config()`` is the single source of the fields: an experiment config
starts from it and overrides values. ``validate(config)`` rejects unknown
fields, wrong types and impossible values with a message that names the field
and the allowed values.
"""
from __future__ import annotations

import ast
import inspect
from typing import Any, Callable, Iterable, List

import ml_collections

from l2ojax.meta.curriculum import PAPER_SCHEDULE
PAPER_IL_RATIOS = (0.0, 0.1, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3)
ADAM_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)

# Free-form sections: their keys are a factory's keyword arguments, checked against it.
FREE_FORM = ("model.options", "optimizee.options")


class ConfigError(ValueError):
  """A config field is unknown, of the wrong type, or has an impossible value."""


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "l2ojax"
  c.seed = 0
  c.model = ml_collections.ConfigDict({"name": "dm", "options": {}})
  c.optimizee = ml_collections.ConfigDict({"name": "quadratic", "options": {}})
  c.data = ml_collections.ConfigDict(
      {"source": "auto", "path": "", "split": "test", "data_dir": ""})
  c.meta = ml_collections.ConfigDict({
      "batch_size": 32,          # B optimizees per meta-step (vmapped)
      "segment_length": 20,      # truncated-BPTT segment
      "episode_steps": 100,      # optimizee steps per episode (without a curriculum)
      "num_episodes": 300,
      "learning_rate": 1e-3,
      "optimizer": "adam",
      "clip_global_norm": 0.0,   # 0 = no clipping
      "clip_value": 0.0,         # elementwise meta-gradient clip (L2O-Scale: 1e4); 0 = off
      "zero_nans": False,        # zero non-finite meta-gradient entries (L2O-Scale's)
      "loss": "sum",             # sum over t = 0..T (the paper's); mean, last, log_ratio
      "second_order": False,     # keep d(grad)/d(params) in the meta-gradient
      "divergence_bound": 1e3,   # an optimizee whose loss passes this x its initial loss is reset
      # What backprop recomputes: "auto" | "" (save all) | "update" | "update_dots".
      "remat": "auto",
      "remat_chunk": 0,          # > 0: keep the recurrent state every k steps, recompute the rest
      "scan_unroll": 1,          # optimizee steps per iteration of the compiled loop
      # the fused LSTM kernels keep each step's saved inputs on one tape for the segment,
      # written and read in place (lstm_kernel="pallas"; remat off: "" or "auto" on a GPU)
      "residual_tape": False,
      "shard": False,            # split the optimizee batch over all devices (jax.sharding)
  })
  c.validation = ml_collections.ConfigDict(
      {"period": 10, "num_optimizees": 64, "steps": 0,  # steps 0 = the episode length
       "score": "last"})
  c.curriculum = ml_collections.ConfigDict(
      {"enabled": False, "schedule": PAPER_SCHEDULE, "min_num_eval": 3})
  c.imitation = ml_collections.ConfigDict({
      "enabled": False, "teacher": "adam", "learning_rate": 0.01, "ratios": PAPER_IL_RATIOS,
      "ratio": 0.3, "k": 1, "separate_outer_state": True})
  c.checkpoint_every = 25
  c.tensorboard = False  # also WORKDIR/tensorboard/ event files (needs tensorboardX)
  c.eval = ml_collections.ConfigDict({
      "num_optimizees": 64, "steps": 100, "seed": 12345,
      "adam_learning_rates": ADAM_LEARNING_RATES})
  return c


def _type_ok(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, str):
    return isinstance(value, str)
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return True


def _check_fields(config: Any, reference: Any, prefix: str, errors: List[str]) -> None:
  for key in config.keys():
    path = f"{prefix}{key}"
    if key not in reference:
      errors.append(f"unknown field {path!r}; allowed in {prefix.rstrip('.') or 'the config'}: "
                    f"{sorted(reference.keys())}")
      continue
    value, default = config[key], reference[key]
    if isinstance(default, ml_collections.ConfigDict):
      if path in FREE_FORM:
        continue
      if not isinstance(value, (ml_collections.ConfigDict, dict)):
        errors.append(f"{path} must be a section with fields {sorted(default.keys())}, "
                      f"got {type(value).__name__}")
        continue
      _check_fields(value, default, path + ".", errors)
    elif not _type_ok(value, default):
      errors.append(f"{path}={value!r} has type {type(value).__name__}; expected "
                    f"{type(default).__name__}")


def override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies ``item``, ``field.path=value``, to ``config`` in place.

  The value is a Python literal where it parses as one (``1e-3``, ``(100,
  200)``, ``True``), else the string. The field must exist, except directly
  under a free-form section (``model.options``, ``optimizee.options``),
  whose keys are the factory's options: there a new key is added (``validate``
  checks it against the factory), e.g. ``model.options.lstm_kernel=pallas``.
  """
  if "=" not in item:
    raise ConfigError(f"override expects field=value, got {item!r}")
  path, raw = item.split("=", 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  *parents, leaf = path.split(".")
  node = config
  for i, p in enumerate(parents):
    if p not in node:
      raise ConfigError(f"override {path}: no field {'.'.join(parents[:i + 1])!r}")
    node = node[p]
  if leaf not in node and ".".join(parents) not in FREE_FORM:
    raise ConfigError(f"override {path}: no field {path!r}; allowed in "
                      f"{'.'.join(parents) or 'the config'}: {sorted(node.keys())}")
  try:
    if leaf in node:
      node[leaf] = value
    else:
      with node.unlocked():  # config_flags locks the configs it loads
        node[leaf] = value
  except TypeError as e:  # ml_collections keeps a field's type
    raise ConfigError(f"override {path}={raw}: {e}") from None


def _factory_kwargs_ok(factory: Callable, options: Iterable[str], field: str,
                       errors: List[str]) -> None:
  params = inspect.signature(factory).parameters
  if any(p.kind == p.VAR_KEYWORD for p in params.values()):
    return
  for opt in options:
    if opt not in params:
      errors.append(f"unknown field {field}.{opt!r}; allowed: {sorted(params)}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every problem, before anything is built or compiled."""
  from l2ojax import models, optimizees  # the registries, filled at import
  from l2ojax.meta import losses

  errors: List[str] = []
  _check_fields(config, default_config(), "", errors)
  if errors:  # later checks assume known fields of the right types
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  defaults = default_config()

  def get(section: str, key: str) -> Any:  # a missing section or field takes its default
    if section in config and key in config[section]:
      return config[section][key]
    return defaults[section][key]

  def need(ok: bool, message: str) -> None:
    if not ok:
      errors.append(message)

  for field in ("batch_size", "segment_length", "episode_steps", "num_episodes"):
    need(get("meta", field) >= 1, f"meta.{field}={get('meta', field)} must be >= 1")
  need(get("meta", "learning_rate") > 0, f"meta.learning_rate={get('meta', 'learning_rate')} "
       f"must be > 0")
  need(get("meta", "clip_global_norm") >= 0, "meta.clip_global_norm must be >= 0 (0 = off)")
  need(get("meta", "clip_value") >= 0, "meta.clip_value must be >= 0 (0 = off)")
  need(get("meta", "divergence_bound") > 0, "meta.divergence_bound must be > 0")
  need(get("meta", "remat_chunk") >= 0,
       f"meta.remat_chunk={get('meta', 'remat_chunk')} must be >= 0 (0 = off)")
  need(get("meta", "scan_unroll") >= 1,
       f"meta.scan_unroll={get('meta', 'scan_unroll')} must be >= 1")
  from l2ojax.meta import remat as remat_lib
  need(get("meta", "remat") in ("", remat_lib.AUTO) + tuple(remat_lib.POLICIES),
       f"meta.remat={get('meta', 'remat')!r}; allowed: "
       f"{['', remat_lib.AUTO] + sorted(remat_lib.POLICIES)}")
  if get("meta", "residual_tape"):
    need(not (remat_lib.resolve(get("meta", "remat") or None) or get("meta", "remat_chunk")),
         f"meta.residual_tape with meta.remat={get('meta', 'remat')!r} (here "
         f"{remat_lib.resolve(get('meta', 'remat') or None)!r}) and meta.remat_chunk="
         f"{get('meta', 'remat_chunk')}: a recomputed update would write its tape again; "
         "set meta.remat='' and meta.remat_chunk=0")
  if get("meta", "shard"):
    import jax
    n = jax.device_count()
    need(get("meta", "batch_size") % n == 0, f"meta.batch_size={get('meta', 'batch_size')} "
         f"must be a multiple of the {n} devices when meta.shard")
  need(get("meta", "optimizer") in ("adam", "rmsprop", "sgd"),
       f"meta.optimizer={get('meta', 'optimizer')!r}; allowed: ['adam', 'rmsprop', 'sgd']")
  need(get("meta", "loss") in losses.META_LOSSES,
       f"meta.loss={get('meta', 'loss')!r}; allowed: {sorted(losses.META_LOSSES)}")
  seg = get("meta", "segment_length")
  lengths = (list(get("curriculum", "schedule")) if get("curriculum", "enabled")
             else [get("meta", "episode_steps")])
  if get("curriculum", "enabled"):
    need(len(lengths) > 0, "curriculum.schedule is empty; give the steps per episode by stage, "
         f"e.g. {list(PAPER_SCHEDULE)}")
    need(get("curriculum", "min_num_eval") >= 1, "curriculum.min_num_eval must be >= 1")
    need(get("validation", "period") >= 1,
         "validation.period must be >= 1 when curriculum.enabled (stages advance on validation)")
  field = "curriculum.schedule" if get("curriculum", "enabled") else "meta.episode_steps"
  for n in lengths:
    need(isinstance(n, int) and n >= 1, f"{field}: episode length {n!r} must be a positive int")
    if isinstance(n, int) and n >= 1 and seg >= 1:
      need(seg <= n, f"meta.segment_length={seg} is longer than an episode ({field}: {n} steps)")
      need(n % seg == 0, f"{field}: episode length {n} is not a multiple of "
           f"meta.segment_length={seg}")
  need(get("validation", "period") >= 0, "validation.period must be >= 0 (0 = never)")
  need(get("validation", "num_optimizees") >= 1, "validation.num_optimizees must be >= 1")
  need(get("validation", "steps") >= 0, "validation.steps must be >= 0 (0 = episode length)")
  need(get("validation", "score") in ("last", "mean", "log_last"),
       f"validation.score={get('validation', 'score')!r}; allowed: ['last', 'log_last', 'mean']")
  if get("imitation", "enabled"):
    need(get("imitation", "teacher") in ("adam", "rmsprop", "nesterov"),
         f"imitation.teacher={get('imitation', 'teacher')!r}; allowed: "
         f"['adam', 'nesterov', 'rmsprop']")
    need(get("imitation", "learning_rate") > 0, "imitation.learning_rate must be > 0")
    need(get("imitation", "k") >= 1, "imitation.k must be >= 1")
    if get("imitation", "k") >= 1:
      need(seg % get("imitation", "k") == 0, f"meta.segment_length={seg} must be a multiple "
           f"of imitation.k={get('imitation', 'k')}")
    # per stage with the curriculum; without it the single imitation.ratio
    field = "ratios" if get("curriculum", "enabled") else "ratio"
    ratios = (list(get("imitation", "ratios")) if field == "ratios"
              else [get("imitation", "ratio")])
    need(len(ratios) > 0, "imitation.ratios is empty")
    need(all(0.0 <= r <= 1.0 for r in ratios),
         f"imitation.{field}={get('imitation', field)} must lie in [0, 1]"
         + ("" if field == "ratios" else " (imitation.ratios applies with the curriculum)"))
  every = config.get("checkpoint_every", defaults.checkpoint_every)
  need(every >= 1, f"checkpoint_every={every} must be >= 1")
  need(get("eval", "num_optimizees") >= 1 and get("eval", "steps") >= 1,
       "eval.num_optimizees and eval.steps must be >= 1")
  need(len(get("eval", "adam_learning_rates")) > 0
       and all(lr > 0 for lr in get("eval", "adam_learning_rates")),
       "eval.adam_learning_rates must be a non-empty list of positive rates")
  need(get("data", "source") in optimizees.data.SOURCES,
       f"data.source={get('data', 'source')!r}; allowed: {list(optimizees.data.SOURCES)}")
  if config.model.name not in models.names():
    errors.append(f"model.name={config.model.name!r} is unknown; allowed: {models.names()}")
  else:
    try:  # building a model is cheap (no arrays, no compilation) and checks every option
      models.get(config.model.name, **dict(config.model.get("options", {}) or {}))
    except (TypeError, ValueError) as e:
      errors.append(f"model.options: {e}")
  if config.optimizee.name not in optimizees.names():
    errors.append(f"optimizee.name={config.optimizee.name!r} is unknown; allowed: "
                  f"{optimizees.names()}")
  else:
    _factory_kwargs_ok(optimizees._REGISTRY[config.optimizee.name],
                       config.optimizee.get("options", {}), "optimizee.options", errors)
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
