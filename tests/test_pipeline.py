"""Host pipeline: per-sample seeds make batches independent of workers and processes."""

import functools
import os
from multiprocessing import shared_memory

import numpy as np
import pytest

from configs import demo
from twostage_jax import synthesis
from twostage_jax.runtime import pipeline


@functools.cache
def source_store(size):
  synthesis_config = demo.get_config().synthesis
  return synthesis.SourceStore.from_images(
      synthesis.load_anomaly_sources('', size)[:4], synthesis_config.saim_n_segments,
      synthesis_config.saim_compactness, synthesis_config.saim_sigma)


def make_sampler(size, refine=False):
  config = demo.get_config()
  return functools.partial(synthesis.PseudoAnomalySampler, source_store(size), config,
                           2 if refine else 1)


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)


def plan(num_images=10, global_batch=4, local_batch=4, process=0, seed=3, stream=1):
  return pipeline.BatchPlan(num_images, global_batch, local_batch, process, seed, stream)


def test_each_epoch_visits_every_image_once():
  p = plan(num_images=12, global_batch=4, local_batch=4)
  for epoch in range(2):
    seen = [s for step in range(3 * epoch, 3 * epoch + 3) for s in p.samples(step)]
    assert [e for e, _ in seen] == [epoch] * 12
    assert sorted(i for _, i in seen) == list(range(12))
  orders = [[i for step in range(3 * e, 3 * e + 3) for _, i in p.samples(step)] for e in (0, 1)]
  assert orders[0] != orders[1]  # a new permutation every epoch


def test_process_slices_make_up_the_global_batch(images):
  sample = make_sampler(32)()
  whole = pipeline.build_batch(images, sample, plan(), step=5)
  parts = [pipeline.build_batch(images, sample, plan(local_batch=2, process=p), step=5)
           for p in (0, 1)]
  for key in ('image', 'mask'):
    np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_batches_are_a_function_of_step_and_seed(images):
  factory = make_sampler(32)
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


def test_each_stage_has_its_own_stream_of_samples(images):
  factory = make_sampler(32)
  first = list(pipeline.batches(images, factory, plan(stream=1), 0, 6, num_workers=0,
                                prefetch=1))
  second = list(pipeline.batches(images, factory, plan(stream=2), 0, 6, num_workers=0,
                                 prefetch=1))
  order = lambda stream: [i for step in range(6) for _, i in plan(stream=stream).samples(step)]
  assert order(1) != order(2)
  assert sorted(order(1)[:10]) == sorted(order(2)[:10]) == list(range(10))
  for x, y in zip(first, second):
    assert not np.array_equal(x['image'], y['image'])
  # The same image in the same epoch gets other pseudo-anomalies.
  sample = factory()
  both = []
  for epoch in range(3):
    for index, image in enumerate(images):
      masks = [sample(image.astype(np.float32) / 255, plan(stream=s).rng(epoch, index))['mask']
               for s in (1, 2)]
      if masks[0].any() and masks[1].any():
        both.append(masks)
  assert len(both) >= 3
  assert all(not np.array_equal(a, b) for a, b in both)


def test_worker_pool_gives_the_same_batches_in_order(images):
  factory = make_sampler(32)
  serial = list(pipeline.batches(images, factory, plan(), 0, 7, num_workers=0, prefetch=1))
  pooled = list(pipeline.batches(images, factory, plan(), 0, 7, num_workers=2, prefetch=3))
  assert len(pooled) == 7
  for x, y in zip(serial, pooled):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['mask'], y['mask'])


def test_stage2_samples_carry_the_slic_labels_of_the_pseudo_anomalous_image(images):
  stage1 = pipeline.build_batch(images, make_sampler(32)(), plan(), step=2)
  stage2 = pipeline.build_batch(images, make_sampler(32, refine=True)(), plan(), step=2)
  assert set(stage1) == {'image', 'mask'} and set(stage2) == {'image', 'mask', 'labels'}
  for key in ('image', 'mask'):  # one stream: the labels add nothing random
    np.testing.assert_array_equal(stage1[key], stage2[key])
  refine = demo.get_config().refine
  for image, labels in zip(stage2['image'], stage2['labels']):
    expected = synthesis.slic_labels(image, refine.n_segments, refine.compactness, refine.sigma)
    np.testing.assert_array_equal(labels, expected)
    assert labels.dtype == np.int32 and labels.shape == (32, 32)


def test_pooled_stage2_batches_keep_every_array_and_dtype(images):
  factory = make_sampler(32, refine=True)
  serial = list(pipeline.batches(images, factory, plan(), 0, 5, num_workers=0, prefetch=1))
  # The first two batches travel through the pipe, the rest in shared memory.
  pooled = list(pipeline.batches(images, factory, plan(), 0, 5, num_workers=1, prefetch=2))
  for x, y in zip(serial, pooled, strict=True):
    assert {k: v.dtype for k, v in x.items()} == {k: v.dtype for k, v in y.items()}
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.skipif(not os.path.isdir('/dev/shm'), reason='needs /dev/shm to list segments')
def test_leaving_the_pool_early_frees_its_shared_memory(images):
  def segments():  # this process's segments (other programs may use shared memory)
    return {name for name in os.listdir('/dev/shm') if name.startswith(pipeline.segment_prefix())}

  before = segments()
  stream = pipeline.batches(images, make_sampler(32), plan(), 0, 50, num_workers=1, prefetch=2)
  for step, _ in enumerate(stream):
    if step == 4:
      assert segments() - before  # the slots exist while running
      break
  stream.close()
  assert segments() - before == set()


def test_a_batch_larger_than_its_slot_is_not_written():
  slot = shared_memory.SharedMemory(create=True, size=64)
  try:
    small = {'a': np.arange(4, dtype=np.float32), 'b': np.ones((2, 2), np.int32)}
    layout = pipeline._write_to_slot(small, slot)
    assert layout == [('a', (4,), '<f4', 0), ('b', (2, 2), '<i4', 16)]
    np.testing.assert_array_equal(np.ndarray((2, 2), np.int32, buffer=slot.buf, offset=16), 1)
    assert pipeline._write_to_slot({'a': np.zeros(17, np.float32)}, slot) is None
  finally:
    slot.close()
    slot.unlink()
