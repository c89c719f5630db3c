"""Host pipeline: per-sample seeds make batches independent of workers and processes."""

import functools

import numpy as np
import pytest

from configs import demo
from twostage_jax import pipeline
from twostage_jax import synthesis


def make_synthesizer(size):
  config = demo.get_config()
  sources = synthesis.load_anomaly_sources('', size)[:4]
  return functools.partial(synthesis.PseudoAnomalySynthesizer, sources, config.synthesis, None)


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)


def plan(num_images=10, global_batch=4, local_batch=4, process=0, seed=3):
  return pipeline.BatchPlan(num_images, global_batch, local_batch, process, seed)


def test_each_epoch_visits_every_image_once():
  p = plan(num_images=12, global_batch=4, local_batch=4)
  for epoch in range(2):
    seen = [s for step in range(3 * epoch, 3 * epoch + 3) for s in p.samples(step)]
    assert [e for e, _ in seen] == [epoch] * 12
    assert sorted(i for _, i in seen) == list(range(12))
  orders = [[i for step in range(3 * e, 3 * e + 3) for _, i in p.samples(step)] for e in (0, 1)]
  assert orders[0] != orders[1]  # a new permutation every epoch


def test_process_slices_make_up_the_global_batch(images):
  synthesize = make_synthesizer(32)()
  whole = pipeline.build_batch(images, synthesize, plan(), step=5)
  parts = [pipeline.build_batch(images, synthesize, plan(local_batch=2, process=p), step=5)
           for p in (0, 1)]
  for key in ('image', 'mask'):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_batches_are_a_function_of_step_and_seed(images):
  factory = make_synthesizer(32)
  a = list(pipeline.batches(images, factory, plan(), 0, 6, num_workers=0, prefetch=2))
  b = list(pipeline.batches(images, factory, plan(), 3, 6, num_workers=0, prefetch=2))
  for x, y in zip(a[3:], b):
    np.testing.assert_array_equal(x['image'], y['image'])
  c = list(pipeline.batches(images, factory, plan(seed=4), 0, 6, num_workers=0, prefetch=2))
  assert any(not np.array_equal(x['image'], y['image']) for x, y in zip(a, c))
  anomalous = sum(int(batch['mask'].reshape(4, -1).max(1).sum()) for batch in a)
  assert 0 < anomalous < 24  # the stream mixes normal and pseudo-anomalous samples
  for batch in a:
    assert batch['image'].dtype == np.float32 and batch['image'].shape == (4, 32, 32, 3)
    assert batch['mask'].shape == (4, 32, 32)


def test_worker_pool_gives_the_same_batches_in_order(images):
  factory = make_synthesizer(32)
  serial = list(pipeline.batches(images, factory, plan(), 0, 7, num_workers=0, prefetch=1))
  pooled = list(pipeline.batches(images, factory, plan(), 0, 7, num_workers=2, prefetch=3))
  assert len(pooled) == 7
  for x, y in zip(serial, pooled):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['mask'], y['mask'])
