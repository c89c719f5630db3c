"""Methods as plug-ins: the registry, and a method defined only here through train and evaluate."""

import os
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import float32_tolerance  # tests/float32_tolerance.py
from configs import bauer
from configs import demo
from twostage_jax import Detector
from twostage_jax import config_validation
from twostage_jax import data
from twostage_jax import methods
from twostage_jax.evaluation import evaluate
from twostage_jax.inference import detector
from twostage_jax.inference import engine
from twostage_jax.methods import base
from twostage_jax.training import train

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       'twostage_jax')


def test_unknown_method_names_the_known_ones():
  with pytest.raises(ValueError, match="unknown method 'draem'; known methods: 'anoseg', "
                                       "'bauer', 'two_stage', 'utad'"):
    methods.get('draem')
  config = bauer.get_config()
  config.method = 'draem'
  with pytest.raises(ValueError, match='known methods'):
    config_validation.validate(config)


def test_only_the_registry_and_the_plug_ins_know_method_names():
  # The shared machinery never asks which method it serves.
  pattern = re.compile(r"method\s*[!=]=|== *'(bauer|two_stage)'|'bauer' *==")
  offenders = []
  for folder, _, names in os.walk(PACKAGE):
    if os.path.relpath(folder, PACKAGE).startswith('methods'):
      continue
    for name in names:
      if name.endswith('.py'):
        with open(os.path.join(folder, name)) as f:
          offenders += [f'{name}: {line.strip()}' for line in f if pattern.search(line)]
  assert not offenders


class _TinyNet(nn.Module):
  """One BatchNorm'd convolution to a one-channel map."""

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train, axis_name=None if not train else 'data')(x)
    return nn.sigmoid(nn.Conv(1, (1, 1))(nn.relu(x)))[..., 0]


class _BrightSquareSampler:
  """A bright square on the normal image; its mask."""

  def __init__(self, size: int):
    self._size = size

  def __call__(self, image, rng):
    mask = np.zeros(image.shape[:2], np.float32)
    top, left = rng.integers(0, image.shape[0] - self._size, 2)
    mask[top:top + self._size, left:left + self._size] = 1.0
    return {'image': np.clip(image + 0.5 * mask[..., None], 0, 1).astype(np.float32),
            'mask': mask}


def _make_sampler():
  return _BrightSquareSampler(6)


class _SquareFinder(base.Method):
  """A method that exists only in this test: nothing shared was edited for it."""

  name = 'square_finder'
  stages = (1,)

  def create_model(self, config, stage):
    return _TinyNet()

  def objective(self, config, stage):
    def l2(prediction, batch):
      loss = jnp.mean((prediction - batch['mask']) ** 2)
      return loss, {'loss': loss}
    return l2

  def sampler_factory(self, config, stage, images):
    return _make_sampler

  def map_names(self, config, trained):
    return ('squares',)

  def maps_fn(self, config, trained):
    model = self.create_model(config, 1)
    return lambda variables, batch: {'squares': model.apply(variables[0], batch['image'],
                                                            train=False)}


def _registered(method):
  """A fixture that registers `method` for a test and forgets it afterwards."""
  @pytest.fixture
  def fixture():
    methods.register(method)
    yield
    methods.unregister(method.name)
  return fixture


def _tiny_config(method, tmp_path, num_steps, **extra):
  """The demo at 32x32, a few images, `num_steps` steps with a checkpoint halfway."""
  config = demo.get_config()
  config.update_from_flattened_dict({
      'method': method, 'cache_dir': str(tmp_path / 'cache'), 'image_size': 32,
      'demo.num_train': 12, 'demo.num_test_good': 3, 'demo.num_test_per_defect': 2,
      'train.num_workers': 0, 'train.num_steps': num_steps, 'train.log_every': num_steps // 2,
      'train.checkpoint_every': num_steps // 2, 'eval.batch_size': 8, 'eval.num_examples': 1,
      **extra,
  })
  config_validation.validate(config)
  return config


square_finder = _registered(_SquareFinder())


def test_a_new_method_plugs_in_by_registering_it(square_finder, tmp_path):
  config = _tiny_config('square_finder', tmp_path, 6)
  assert train.stages_to_train(methods.get(config.method), config) == (1,)
  workdir = str(tmp_path / 'run')
  state = train.train(methods.get(config.method), config, workdir, 1)
  assert int(state.step) == 6
  results = evaluate.evaluate(config, workdir)
  assert results['final_map'] == 'squares' and list(results['rows']) == ['squares']
  assert results['stage1_step'] == 6 and 'stage2_step' not in results
  assert results['thresholds']['method'] == 'square_finder'


class _ThreeStageSquares(_SquareFinder):
  """Three stages, each built on the frozen ones before it, and their mean as the final map."""

  name = 'three_squares'
  stages = (1, 2, 3)
  MAPS = ('stage 1', 'stage 2', 'stage 3', 'mean')

  def frozen_stages(self, stage):
    return tuple(range(1, stage))

  def map_names(self, config, trained):
    return self.MAPS[:len(trained)] + (('mean',) if len(trained) == 3 else ())

  def maps_fn(self, config, trained):
    model = self.create_model(config, 1)

    def maps(variables, batch):
      out = {f'stage {i + 1}': model.apply(v, batch['image'], train=False)
             for i, v in enumerate(variables)}
      if len(variables) == 3:
        out['mean'] = sum(out.values()) / 3
      return out

    return maps


three_squares = _registered(_ThreeStageSquares())


def test_a_three_stage_method_trains_evaluates_and_exports_without_shared_edits(
    three_squares, tmp_path):
  config = _tiny_config('three_squares', tmp_path, 4, **{
      'train.tensorboard': False, 'export.platforms': ('cpu',)})
  assert train.stages_to_train(methods.get(config.method), config) == (1, 2, 3)
  workdir = str(tmp_path / 'run')
  for stage in (1, 2, 3):
    assert int(train.train(methods.get(config.method), config, workdir, stage).step) == 4
  results = evaluate.evaluate(config, workdir)
  assert list(results['rows']) == ['stage 1', 'stage 2', 'stage 3', 'mean']
  assert results['final_map'] == 'mean'
  assert (results['stage1_step'], results['stage2_step'], results['stage3_step']) == (4, 4, 4)
  with open(os.path.join(workdir, 'eval', 'report.md'), encoding='utf-8') as f:
    assert '| stage-1 step | stage-2 step | stage-3 step |' in f.read()
  earlier = config.copy_and_resolve_references()
  earlier.eval.stage3_step = 2  # a stage the shared config does not name, chosen by step
  assert engine.load_model(earlier, workdir).stage_steps == (4, 4, 2)
  images = data.category_test_set(config).images
  expected = engine.anomaly_maps(config, engine.load_model(config, workdir), images)['mean']
  folder = detector.export(config, workdir)
  prediction = Detector.load(folder).predict(images)
  float32_tolerance.assert_same_function(np.stack(prediction.maps), expected)
