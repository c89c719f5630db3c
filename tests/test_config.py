"""Configs: both recipes are valid, bad values are named in the error."""

import pytest

from configs import demo
from configs import mvtec
from twostage_jax import config_validation


@pytest.mark.parametrize('get_config', [mvtec.get_config, demo.get_config])
def test_shipped_configs_are_valid(get_config):
  config_validation.validate(get_config())


def test_paper_recipe_values():
  config = mvtec.get_config()
  assert (config.image_size, config.model.width, config.train.global_batch_size) == (256, 128, 8)
  assert config.train.learning_rate == 1e-4
  assert tuple(config.train.lr_decay_fractions) == (0.8, 0.9)
  assert config.train.lr_decay_factor == 0.2
  assert config.synthesis.p_anomaly == 0.5 and config.synthesis.p_perlin == 0.5


@pytest.mark.parametrize('key, value, message', [
    ('image_size', 30, 'config.image_size = 30 must be a positive multiple of 4'),
    ('train.num_workers', -1, 'config.train.num_workers = -1 must be 0'),
    ('synthesis.p_anomaly', 1.5, 'config.synthesis.p_anomaly = 1.5 must be a probability'),
    ('eval.score_filter_size', 20, 'config.eval.score_filter_size = 20 must be a positive odd'),
    ('train.lr_decay_fractions', (0.8, 1.2), 'must be fractions in'),
    ('synthesis.saim_n_segments', (), 'must be a non-empty list'),
])
def test_bad_values_are_named(key, value, message):
  config = mvtec.get_config()
  section, _, name = key.rpartition('.')
  (config[section] if section else config)[name] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    config_validation.validate(config)


def test_every_problem_is_reported_at_once():
  config = mvtec.get_config()
  config.model.width = 0
  config.train.num_steps = 0
  with pytest.raises(ValueError) as error:
    config_validation.validate(config)
  assert 'config.model.width = 0' in str(error.value)
  assert 'config.train.num_steps = 0' in str(error.value)
