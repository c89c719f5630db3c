"""Data parallelism: 8 devices give the same step as 1 device."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import demo
from twostage_jax import parallel
from twostage_jax import train
from twostage_jax.models.segmentation import DATA_AXIS


def small_config():
  config = demo.get_config()
  config.image_size = 32
  config.model.width = 8
  config.train.global_batch_size = 8
  return config


def random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  n, s = config.train.global_batch_size, config.image_size
  masks = np.zeros((n, s, s), np.float32)
  for i in range(0, n, 2):  # half the samples carry a rectangular "anomaly"
    y, x = rng.integers(0, s - 8, 2)
    masks[i, y:y + 8, x:x + 8] = 1.0
  images = rng.random((n, s, s, 3), dtype=np.float32)
  return {'image': images, 'mask': masks}


def run_steps(config, devices, batches):
  mesh = Mesh(np.array(devices), (DATA_AXIS,))
  state = jax.device_put(train.create_train_state(config, train.prng_key(0)),
                         parallel.replicated(mesh))
  step = parallel.data_parallel(functools.partial(train.train_step, loss_config=config.loss), mesh)
  losses = []
  for i, batch in enumerate(batches):
    sharded = jax.device_put(batch, parallel.batch_sharded(mesh))
    state, metrics = step(state, sharded, train.prng_key(i))
    losses.append(float(metrics['loss']))
  return jax.device_get(state), losses


def assert_states_close(state_a, state_b, atol):
  leaves_a = jax.tree.leaves((state_a.params, state_a.batch_stats))
  leaves_b = jax.tree.leaves((state_b.params, state_b.batch_stats))
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)


@pytest.mark.parametrize('num_steps', [1, 2])
def test_eight_devices_match_one_device(num_steps):
  assert jax.device_count() == 8, 'tests/conftest.py should simulate 8 CPU devices'
  config = small_config()
  batches = [random_batch(config, seed) for seed in range(num_steps)]
  state8, losses8 = run_steps(config, jax.devices(), batches)
  state1, losses1 = run_steps(config, jax.devices()[:1], batches)
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  # Adam divides each gradient element by its own magnitude (its first step
  # is lr * g / (|g| + eps)), so an element whose gradient is near rounding
  # level moves by a rounding-determined fraction of a step: the absolute
  # tolerance is 1e-3 of a learning-rate step per step taken.
  assert_states_close(state8, state1, atol=1e-3 * config.train.learning_rate * num_steps)
  # The steps did move the parameters, so the comparison is not vacuous.
  fresh = train.create_train_state(config, train.prng_key(0))
  moved = [np.abs(np.asarray(a) - np.asarray(b)).max()
           for a, b in zip(jax.tree.leaves(state1.params), jax.tree.leaves(fresh.params))]
  assert min(moved) > 0.5 * config.train.learning_rate


def test_global_batch_must_divide_by_devices():
  with pytest.raises(ValueError, match='global batch size 6 does not divide by the 8 devices'):
    parallel.local_batch_size(6)
  assert parallel.local_batch_size(16) == 16
