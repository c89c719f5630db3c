"""Configs: both recipes are valid, bad values are named in the error."""

import jax.numpy as jnp
import optax
import pytest
from absl import flags
from ml_collections import config_flags

from configs import bauer
from configs import demo
from configs import mvtec
from configs import mvtec_cpu
from twostage_jax import config_validation
from twostage_jax import methods
from twostage_jax.methods.two_stage import method as two_stage
from twostage_jax.runtime import parallel
from twostage_jax.training import schedules
from twostage_jax.training import train_state


@pytest.mark.parametrize('get_config', [mvtec.get_config, demo.get_config,
                                        mvtec_cpu.get_config, bauer.get_config])
def test_shipped_configs_are_valid(get_config):
  config_validation.validate(get_config())


def test_paper_recipe_values():
  config = mvtec.get_config()
  assert (config.image_size, config.model.width, config.train.global_batch_size) == (256, 128, 8)
  assert config.train.learning_rate == 1e-4
  assert tuple(config.train.lr_decay_fractions) == (0.8, 0.9)
  assert config.train.lr_decay_factor == 0.2
  assert config.synthesis.p_anomaly == 0.5 and config.synthesis.p_perlin == 0.5
  refine = config.refine
  assert (refine.n_segments, refine.compactness, refine.sigma) == (250, 8.0, 1.0)
  assert refine.median_size == 3 and refine.combine == 'sum' and config.stage == 'both'
  # Paper 001: L2 + SSIM trains both networks.
  for stage in (1, 2):
    loss = two_stage.stage_loss(config, stage)
    assert (loss.l2_weight, loss.ssim_weight) == (1.0, 1.0)
  # The public code's test-time rule, chosen over 'absolute' on bottle and grid.
  assert refine.threshold_rule == 'tasad' and refine.threshold == 0.5
  assert (refine.tasad_th_pix, refine.tasad_th_val) == (0.95, 30)
  assert config.eval.map_sigma == 0.0 and not config.xla_cpu_options


def parse_config(*overrides):
  """The config as main.py's --config flag builds it from command-line overrides."""
  argv = ['main.py', '--config=configs/mvtec.py', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_loss_overrides_reach_stage_2_unless_stage_2_sets_its_own():
  config = parse_config('--config.loss.ssim_weight=0.3', '--config.loss.ssim_window=7')
  assert two_stage.stage_loss(config, 2).ssim_weight == 0.3
  assert two_stage.stage_loss(config, 2).ssim_window == 7
  config = parse_config('--config.loss.ssim_weight=0.3', '--config.stage2.loss.ssim_weight=0')
  assert two_stage.stage_loss(config, 1).ssim_weight == 0.3
  stage2 = two_stage.stage_loss(config, 2)
  assert stage2.ssim_weight == 0.0 and isinstance(stage2.ssim_weight, float)
  assert stage2.l2_weight == 1.0 and config.loss.ssim_weight == 0.3
  config_validation.validate(config)


@pytest.mark.parametrize('key, value, message', [
    ('image_size', 30, 'config.image_size = 30 must be a positive multiple of 4'),
    ('data_cache', 'lmdb', "config.data_cache = 'lmdb' must be 'tfds' or 'none'"),
    ('train.num_workers', -1, 'config.train.num_workers = -1 must be 0'),
    ('synthesis.p_anomaly', 1.5, 'config.synthesis.p_anomaly = 1.5 must be a probability'),
    ('eval.score_filter_size', 20, 'config.eval.score_filter_size = 20 must be a positive odd'),
    ('train.lr_decay_fractions', (0.8, 1.2), 'must be fractions in'),
    ('synthesis.saim_n_segments', (), 'must be a non-empty list'),
    ('stage', '3', "config.stage = '3' must be 'both' or '1' or '2' for method 'two_stage'"),
    ('refine.combine', 'product', "config.refine.combine = 'product' must be 'sum'"),
    ('refine.threshold_rule', 'otsu', "must be 'absolute' or 'relative' or 'tasad'"),
    ('refine.tasad_th_pix', 0.0, 'config.refine.tasad_th_pix = 0.0 must be in'),
    ('refine.tasad_th_val', 255, 'config.refine.tasad_th_val = 255 must be in'),
    ('refine.train_rule', 'all', "must be 'test' or 'tasad'"),
    ('refine.train_tasad_th_pix', 0.0, 'config.refine.train_tasad_th_pix = 0.0 must be in'),
    ('synthesis.recipe', 'cutpaste', "config.synthesis.recipe = 'cutpaste' must be 'draem' or "
     "'tasad'"),
    ('model.init', 'kaiming', "config.model.init = 'kaiming' must be 'lecun' or 'normal'"),
    ('model.init_std', 0.0, 'config.model.init_std = 0.0 must be positive'),
    ('stage2.p_self_source', 1.5, 'config.stage2.p_self_source = 1.5 must be a probability'),
    ('eval.map_sigma', -1.0, 'config.eval.map_sigma = -1.0 must be 0 or more'),
    ('refine.median_size', 4, 'config.refine.median_size = 4 must be a positive odd'),
    ('stage2.loss.ssim_weight', -1.0, 'config.stage2.loss.ssim_weight = -1.0 must be 0 or more'),
    ('calibration.holdout_fraction', 1.0, 'config.calibration.holdout_fraction = 1.0 must be'),
    ('calibration.pixel_quantile', 0.0, 'config.calibration.pixel_quantile = 0.0 must be'),
    ('train.device_prefetch', 0, 'config.train.device_prefetch = 0 must be at least 1'),
    ('model.compute_dtype', 'float16',
     "config.model.compute_dtype = 'float16' must be 'auto', 'float32', 'bfloat16' or "
     "'float64'"),
    # The tests run without 64-bit JAX, where float64 is refused.
    ('model.compute_dtype', 'float64', 'float64 only with JAX_ENABLE_X64=1'),
])
def test_bad_values_are_named(key, value, message):
  config = mvtec.get_config()
  *sections, name = key.split('.')
  parent = config
  for section in sections:
    parent = parent[section]
  parent[name] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    config_validation.validate(config)


def test_the_public_codes_recipe_has_four_augmenters_to_draw_from():
  config = parse_config('--config.synthesis.recipe=tasad', '--config.synthesis.num_augmenters=4')
  config_validation.validate(config)
  config.synthesis.num_augmenters = 5
  with pytest.raises(ValueError, match="num_augmenters = 5 must be at most 4, the augmenters "
                                       "of synthesis.recipe 'tasad'"):
    config_validation.validate(config)


def test_stage_2_self_sources_apply_to_stage_2_alone():
  config = parse_config('--config.stage2.p_self_source=0.27')
  assert two_stage.stage_synthesis(config, 1).p_self_source == 0.0
  stage2 = two_stage.stage_synthesis(config, 2)
  assert stage2.p_self_source == 0.27 and stage2.p_perlin == config.synthesis.p_perlin
  assert config.synthesis.p_self_source == 0.0
  config = parse_config('--config.synthesis.p_self_source=0.1')
  assert two_stage.stage_synthesis(config, 2).p_self_source == 0.1


def test_every_problem_is_reported_at_once():
  config = mvtec.get_config()
  config.model.width = 0
  config.train.num_steps = 0
  with pytest.raises(ValueError) as error:
    config_validation.validate(config)
  assert 'config.model.width = 0' in str(error.value)
  assert 'config.train.num_steps = 0' in str(error.value)


def test_stage_2_has_its_own_number_of_steps_and_learning_rate_schedule():
  config = mvtec.get_config()
  config.train.num_steps = 100
  assert schedules.stage_steps(config, 2) == 100  # None: the same as stage 1
  config.stage2.num_steps = 10
  assert (schedules.stage_steps(config, 1), schedules.stage_steps(config, 2)) == (100, 10)
  # The optimizer a restored state gets decays at 80% and 90% of its stage's steps.
  mesh = parallel.make_mesh()
  params = {'w': jnp.ones(3)}

  def update_at(stage, count):
    tx = train_state.abstract_train_state(methods.get(config.method), config, mesh, stage).tx
    state = optax.tree_utils.tree_set(tx.init(params), count=jnp.asarray(count, jnp.int32))
    return float(tx.update({'w': jnp.ones(3)}, state, params)[0]['w'][0])

  assert update_at(1, 5) == pytest.approx(update_at(2, 5))  # before stage 2's decays
  assert update_at(1, 9) == pytest.approx(update_at(2, 9) / 0.2 ** 2)  # after both
  assert update_at(1, 90) == pytest.approx(update_at(2, 90))  # both decayed twice
