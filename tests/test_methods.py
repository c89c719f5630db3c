"""Methods as plug-ins: the registry, and a method defined only here through train and evaluate."""

import os
import re

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bauer
from configs import demo
from twostage_jax import config_validation
from twostage_jax import methods
from twostage_jax.evaluation import evaluate
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


@pytest.fixture
def square_finder():
  methods.register(_SquareFinder())
  yield
  methods.unregister('square_finder')


def test_a_new_method_plugs_in_by_registering_it(square_finder, tmp_path):
  config = demo.get_config()
  config.update_from_flattened_dict({
      'method': 'square_finder', 'cache_dir': str(tmp_path / 'cache'), 'image_size': 32,
      'demo.num_train': 12, 'demo.num_test_good': 3, 'demo.num_test_per_defect': 2,
      'train.num_workers': 0, 'train.num_steps': 6, 'train.log_every': 3,
      'train.checkpoint_every': 3, 'eval.batch_size': 8, 'eval.num_examples': 1,
  })
  config_validation.validate(config)
  assert train.stages_to_train(config) == (1,)
  workdir = str(tmp_path / 'run')
  state = train.train(config, workdir, 1)
  assert int(state.step) == 6
  results = evaluate.evaluate(config, workdir)
  assert results['final_map'] == 'squares' and list(results['rows']) == ['squares']
  assert results['stage1_step'] == 6 and 'stage2_step' not in results
  assert results['thresholds']['method'] == 'square_finder'
