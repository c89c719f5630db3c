"""Data parallelism: 8 devices, and 2 processes x 4 devices, give the 1-device step."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from twostage_jax import parallel
from twostage_jax.models.segmentation import DATA_AXIS

import parallel_steps  # tests/parallel_steps.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mesh_of(devices):
  return Mesh(np.array(devices), (DATA_AXIS,))


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  return parallel_steps.small_config(str(tmp_path_factory.mktemp('cache')))


keyed = parallel_steps.keyed


def assert_same_step(config, a, b, num_steps):
  """(keyed variables, losses) pairs a and b: same losses, and the same change of every parameter and statistic."""
  (leaves_a, losses_a), (leaves_b, losses_b) = a, b
  np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5)
  parallel_steps.assert_same_change(keyed(initial_variables(config)), leaves_a, leaves_b,
                                    num_steps)


def initial_variables(config):
  state = parallel_steps.initial_state(config, None)
  return {'params': state.params, 'batch_stats': state.batch_stats}


def test_eight_devices_match_one_device(config):
  assert jax.device_count() == 8, 'tests/conftest.py should simulate 8 CPU devices'
  eight = parallel_steps.run(config, 1, mesh=mesh_of(jax.devices()))
  one = parallel_steps.run(config, 1, mesh=mesh_of(jax.devices()[:1]))
  assert_same_step(config, (keyed(eight[0]), eight[1]), (keyed(one[0]), one[1]), 1)
  # The steps moved every array, so the comparison is not vacuous.
  fresh = keyed(initial_variables(config))
  for name, value in keyed(one[0]).items():
    assert np.abs(value - fresh[name]).max() > 1e-4, name


def test_adam_step_matches_where_the_gradient_is_above_rounding(config):
  """With Adam the first update is lr * g / (|g| + eps), about lr * sign(g):
  where g is rounding noise (a kernel element reading a constant input
  channel in front of BatchNorm has gradient 0 in exact arithmetic) its sign
  is arbitrary. Elsewhere 8 devices and 1 device must agree."""
  lr = config.train.learning_rate
  eight = parallel_steps.run(config, 1, tx=None, mesh=mesh_of(jax.devices()))
  one = parallel_steps.run(config, 1, tx=None, mesh=mesh_of(jax.devices()[:1]))
  np.testing.assert_allclose(eight[1], one[1], rtol=1e-5)
  unit_sgd = optax.sgd(1.0)
  gradient_step = parallel_steps.run(config, 1, tx=unit_sgd, mesh=mesh_of(jax.devices()[:1]))
  fresh = keyed(initial_variables(config)['params'])
  grads = {k: fresh[k] - v for k, v in keyed(gradient_step[0]['params']).items()}
  excluded = total = 0
  params8, params1 = keyed(eight[0]['params']), keyed(one[0]['params'])
  for name, g in grads.items():
    clear = np.abs(g) > 1e-4 * np.abs(g).max()
    excluded += int((~clear).sum())
    total += g.size
    np.testing.assert_allclose(params8[name][clear], params1[name][clear],
                               rtol=1e-5, atol=1e-3 * lr, err_msg=name)
  assert excluded < 0.01 * total


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(config, tmp_path):
  out = tmp_path / 'multi.npz'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  coordinator = f'localhost:{free_port()}'
  processes = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'tests', 'parallel_steps.py'),
       config.cache_dir, str(out), coordinator, '2', str(i)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  for p in processes:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  multi = np.load(out)
  multi_variables = {name: multi[name] for name in multi.files if name != 'losses'}
  # Reference: one process with the same 8-device layout. One step: the
  # cross-process all-reduce sums in another order, and in a second step a
  # ReLU input within that rounding of 0 can flip, moving gradients ~1e-3.
  variables, losses = parallel_steps.run(config, 1, mesh=mesh_of(jax.devices()))
  assert_same_step(config, (multi_variables, multi['losses']), (keyed(variables), losses), 1)


def test_global_batch_must_divide_by_devices():
  with pytest.raises(ValueError, match='global batch size 6 does not divide by the 8 devices'):
    parallel.local_batch_size(6)
  assert parallel.local_batch_size(16) == 16
