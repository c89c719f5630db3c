"""TensorBoard logs of the shared tiny run's stage 1, read back with TensorBoard's own reader."""

import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from twostage_jax import data
from twostage_jax import methods
from twostage_jax.runtime import parallel
from twostage_jax.training import summaries
from tiny_runs import two_stage_config  # tests/tiny_runs.py

NOT_SCALARS = ('stage', 'step', 'time')


def read_events(workdir, stage):
  accumulator = event_accumulator.EventAccumulator(
      summaries.log_dir(workdir, stage),
      size_guidance={event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0})
  return accumulator.Reload()


def decoded(event):
  return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)))


@pytest.fixture(scope='module')
def run(two_stage_run):
  """(config, workdir, events) of the shared run's stage 1: 4 steps, checkpoints at 2 and 4."""
  config, workdir, _ = two_stage_run
  return config, workdir, read_events(workdir, 1)


def test_scalars_are_the_metrics_jsonl_records(run):
  _, workdir, events = run
  expected = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for record in (r for r in map(json.loads, f) if r['stage'] == 1):
      for key, value in record.items():
        if key not in NOT_SCALARS:
          expected.setdefault(f'train/{key}', []).append((record['step'], value))
  assert {'train/loss', 'train/learning_rate', 'train/images_per_s',
          'train/data_wait_fraction'} <= set(expected)
  assert sorted(events.Tags()['scalars']) == sorted(expected)
  for tag, points in expected.items():
    written = events.Scalars(tag)
    assert [e.step for e in written] == [step for step, _ in points], tag
    np.testing.assert_allclose([e.value for e in written], [value for _, value in points],
                               # TensorBoard stores float32: within 2^-24 = 6e-8 of the value.
                               rtol=1e-6, err_msg=tag)


def test_first_samples_at_step_0_and_held_out_maps_at_each_checkpoint(run):
  config, _, events = run
  count, size = config.train.tensorboard_images, config.image_size
  assert sorted(events.Tags()['images']) == [
      'held_out/image', 'held_out/stage_1', 'samples/image', 'samples/mask']
  strips = {}
  for tag, steps in (('samples/image', [0]), ('samples/mask', [0]),
                     ('held_out/image', [2, 4]), ('held_out/stage_1', [2, 4])):
    written = events.Images(tag)
    assert [e.step for e in written] == steps, tag
    strips[tag] = [decoded(e) for e in written]
    for event, strip in zip(written, strips[tag]):
      assert (event.height, event.width) == (size, count * size), tag
      assert strip.shape == (size, count * size, 3), tag
  mask = strips['samples/mask'][0]
  assert (mask == mask[..., :1]).all() and set(np.unique(mask)) <= {0, 255}
  held_out = data.training_images(config)[1][:count]
  for strip in strips['held_out/image']:
    np.testing.assert_array_equal(strip, np.concatenate(list(held_out), axis=1))
  for strip in strips['held_out/stage_1']:  # stretched to the full range
    assert strip.min() == 0 and strip.max() == 255


def test_switched_off_it_writes_no_event_file(tmp_path):
  config = two_stage_config(**{'train.tensorboard': False})
  size = config.image_size
  writer = summaries.Writer(methods.get('two_stage'), str(tmp_path), config, 1, 0,
                            np.zeros((4, size, size, 3), np.uint8), parallel.make_mesh())
  writer.samples({'image': jnp.zeros((8, size, size, 3)), 'mask': jnp.zeros((8, size, size))})
  writer.scalars(1, {'stage': 1, 'step': 1, 'loss': 0.5})
  writer.checkpoint(2, ())
  writer.close()
  assert os.listdir(tmp_path) == []
