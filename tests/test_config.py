"""Bad configs stop before anything is built, with the field and the allowed values named."""
import pytest

from experiments.configs import dm_mnist, rnnprop_mnist, scale_mnist
from l2ojax.meta import config as config_lib


def _config(**overrides):
  c = config_lib.default_config()
  for path, value in overrides.items():
    section, _, field = path.rpartition("__")
    target = c[section] if section else c
    with target.ignore_type():
      target[field] = value
  return c


def test_default_config_is_valid():
  config_lib.validate(config_lib.default_config())


@pytest.mark.parametrize("overrides, message", [
    ({"meta__bach_size": 8}, r"unknown field 'meta.bach_size'.*batch_size"),
    ({"meta__batch_size": "8"}, r"meta.batch_size='8' has type str; expected int"),
    ({"meta__second_order": 1}, r"meta.second_order=1 has type int; expected bool"),
    ({"meta__episode_steps": -100}, r"meta.episode_steps=-100 must be >= 1"),
    ({"meta__segment_length": 200},
     r"segment_length=200 is longer than an episode \(meta.episode_steps: 100 steps\)"),
    ({"meta__segment_length": 30},
     r"meta.episode_steps: episode length 100 is not a multiple of meta.segment_length=30"),
    ({"meta__remat_chunk": -5}, r"meta.remat_chunk=-5 must be >= 0"),
    ({"meta__scan_unroll": 0}, r"meta.scan_unroll=0 must be >= 1"),
    ({"meta__residual_tape": True, "meta__remat": "update"},
     r"meta.residual_tape with meta.remat='update'"),
    ({"meta__residual_tape": True, "meta__remat": "", "meta__remat_chunk": 4},
     r"meta.residual_tape with .*meta.remat_chunk=4"),
    ({"meta__loss": "hinge"},
     r"meta.loss='hinge'; allowed: \['last', 'log_ratio', 'mean', 'sum'\]"),
    ({"meta__optimizer": "lamb"}, r"meta.optimizer='lamb'; allowed"),
    ({"curriculum__enabled": True, "curriculum__schedule": ()}, r"curriculum.schedule is empty"),
    ({"curriculum__enabled": True, "curriculum__schedule": (100, 250)},
     r"curriculum.schedule: episode length 250 is not a multiple"),
    ({"imitation__enabled": True, "imitation__ratio": 1.5},
     r"imitation.ratio=1.5 must lie in \[0, 1\] \(imitation.ratios applies with the curriculum"),
    ({"imitation__enabled": True, "curriculum__enabled": True, "imitation__ratios": (0.1, -0.2)},
     r"imitation.ratios=\(0.1, -0.2\) must lie in \[0, 1\]$"),
    ({"imitation__enabled": True, "imitation__teacher": "lbfgs"}, r"imitation.teacher='lbfgs'"),
    ({"model__name": "transformer"}, r"model.name='transformer' is unknown; allowed: \[.*'dm'"),
    ({"optimizee__name": "imagenet"},
     r"optimizee.name='imagenet' is unknown; allowed: .*quadratic"),
    ({"data__source": "ftp"}, r"data.source='ftp'; allowed"),
    ({"checkpoint_every": 0}, r"checkpoint_every=0 must be >= 1"),
    ({"validation__score": "best"}, r"validation.score='best'"),
])
def test_bad_field_is_named(overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(_config(**overrides))


def test_unknown_model_and_optimizee_options_are_named():
  c = config_lib.default_config()
  c.model.options = {"hiden_sizes": (20,)}
  with pytest.raises(config_lib.ConfigError, match="hiden_sizes"):
    config_lib.validate(c)
  c = config_lib.default_config()
  c.optimizee.options = {"dims": 3}
  with pytest.raises(config_lib.ConfigError, match=r"optimizee.options.'dims'.*dim"):
    config_lib.validate(c)


def test_all_problems_are_reported_at_once():
  c = _config(meta__batch_size=0, meta__num_episodes=0)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert "batch_size" in str(e.value) and "num_episodes" in str(e.value)


def test_train_rejects_a_bad_config_before_building_anything(tmp_path, monkeypatch):
  from l2ojax.meta import trainer
  built = []
  monkeypatch.setattr(trainer, "build_optimizee", lambda c: built.append(c))
  c = config_lib.default_config()
  c.meta.segment_length = 0
  with pytest.raises(config_lib.ConfigError, match="meta.segment_length=0 must be >= 1"):
    trainer.train(c, str(tmp_path / "run"), progress=False)
  assert not built and not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", [dm_mnist, rnnprop_mnist, scale_mnist])
def test_every_family_has_the_same_technique_variants(module):
  for variant in module.VARIANTS:
    c = module.get_config(variant)
    config_lib.validate(c)
    assert c.curriculum.enabled == variant.endswith(("_cl", "_cl_il"))
    assert c.imitation.enabled == variant.endswith(("_il", "_cl_il"))
    assert c.meta.episode_steps == (500 if variant.endswith("_aug") else 100)
  assert set(module.PAPER_LN_LOSS_10K) <= set(module.VARIANTS) == set(module.NAMES)
  with pytest.raises(ValueError, match="variant 'nope'"):
    module.get_config("nope")


def test_family_recipes_follow_the_paper():
  assert scale_mnist.get_config("scale_cl_il").curriculum.schedule[-1] == 5000
  assert rnnprop_mnist.get_config("rnnprop").validation.period == 10
  assert rnnprop_mnist.get_config("rnnprop").meta.num_episodes == 100
  assert dm_mnist.get_config("dm_aug").meta.num_episodes == 5000


def test_override_sets_fields_and_adds_model_options():
  c = dm_mnist.get_config("dm")
  config_lib.override(c, "meta.learning_rate=3e-4")
  config_lib.override(c, "curriculum.schedule=(100, 200)")
  config_lib.override(c, "model.options.lstm_kernel=pallas")  # a new key: a free-form section
  assert c.meta.learning_rate == 3e-4 and tuple(c.curriculum.schedule) == (100, 200)
  assert c.model.options.lstm_kernel == "pallas"
  config_lib.validate(c)
  config_lib.override(c, "model.options.lstm_kernl=pallas")
  with pytest.raises(config_lib.ConfigError, match="lstm_kernl"):
    config_lib.validate(c)


@pytest.mark.parametrize("item, message", [
    ("meta.bach_size=8", r"no field 'meta.bach_size'; allowed in meta: .*'batch_size'"),
    ("metaa.batch_size=8", r"no field 'metaa'"),
    ("meta.batch_size=eight", r"meta.batch_size=eight"),
    ("meta.batch_size", r"expects field=value"),
])
def test_override_names_what_is_wrong(item, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.override(dm_mnist.get_config("dm"), item)
