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

import child_env  # tests/child_env.py
import parallel_steps  # tests/parallel_steps.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mesh_of(devices):
  return Mesh(np.array(devices), (DATA_AXIS,))


@pytest.fixture(scope='module')
def config(tmp_path_factory):
  return parallel_steps.small_config(str(tmp_path_factory.mktemp('cache')))


keyed = parallel_steps.keyed


def assert_same_step(config, got, want):
  """(keyed variables, losses) pairs of `parallel_steps.run`: the same losses and changes.

  The losses are forward values of the same float64 computation in two
  layouts: LAYOUT_TOLERANCE bounds them as it bounds the step
  (tests/parallel_steps.py).
  """
  np.testing.assert_allclose(got[1], want[1], rtol=parallel_steps.LAYOUT_TOLERANCE)
  parallel_steps.assert_same_change(parallel_steps.initial_variables(config), got[0], want[0])


def test_eight_devices_match_one_device(config):
  assert jax.device_count() == 8, 'tests/conftest.py should simulate 8 CPU devices'
  eight = parallel_steps.run(config, 1, mesh=mesh_of(jax.devices()))
  one = parallel_steps.run(config, 1, mesh=mesh_of(jax.devices()[:1]))
  assert_same_step(config, (keyed(eight[0]), eight[1]), (keyed(one[0]), one[1]))
  # The steps moved every array, so the comparison is not vacuous.
  fresh = parallel_steps.initial_variables(config)
  for name, value in keyed(one[0]).items():
    assert np.abs(value - fresh[name]).max() > 1e-4, name
  # A step on another batch: what a wrong layout would look like.
  other = parallel_steps.run(config, 1, mesh=mesh_of(jax.devices()[:1]), batch_offset=1)
  parallel_steps.assert_changed_unlike(fresh, keyed(other[0]), keyed(one[0]))


def test_adam_step_matches_where_the_gradient_is_above_rounding(config):
  """With Adam the first update is u = lr * g / (|g| + eps), about lr * sign(g).

  Where g is rounding noise (a kernel element reading a constant input
  channel in front of BatchNorm has gradient 0 in exact arithmetic) its sign
  is arbitrary: those elements (|g| <= 1e-4 of the array's largest) are
  left out, and must be fewer than 1%. Elsewhere, as |du/dg| <= lr / |g|,
  the layouts' updates differ by at most lr * |dg| / |g|, with |dg| at most
  LAYOUT_TOLERANCE of the gradient's norm (tests/parallel_steps.py) and
  |g| > 1e-4 of its largest element: at most 1e-8 / 1e-4 = 1e-4 of lr,
  plus float64 rounding of the parameters. The tolerance is 1e-3 of lr,
  10x that; a wrong layout turns the sign of a share of the elements and
  moves them by 2 lr.
  """
  lr = config.train.learning_rate
  eight = parallel_steps.run(config, 1, tx=None, mesh=mesh_of(jax.devices()))
  one = parallel_steps.run(config, 1, tx=None, mesh=mesh_of(jax.devices()[:1]))
  np.testing.assert_allclose(eight[1], one[1], rtol=parallel_steps.LAYOUT_TOLERANCE)
  unit_sgd = optax.sgd(1.0)
  gradient_step = parallel_steps.run(config, 1, tx=unit_sgd, mesh=mesh_of(jax.devices()[:1]))
  fresh = parallel_steps.initial_variables(config)
  grads = {k: fresh[k] - v for k, v in keyed(gradient_step[0]).items() if "'params'" in k}
  excluded = total = 0
  params8, params1 = keyed(eight[0]), keyed(one[0])
  for name, g in grads.items():
    clear = np.abs(g) > 1e-4 * np.abs(g).max()
    excluded += int((~clear).sum())
    total += g.size
    np.testing.assert_allclose(params8[name][clear], params1[name][clear],
                               rtol=0, atol=1e-3 * lr, err_msg=name)
  assert excluded < 0.01 * total


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(config, tmp_path):
  out = tmp_path / 'multi.npz'
  env = child_env.environment(4)
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
  # Reference: one process with the same 8-device layout, in float64 as the
  # processes were; the cross-process all-reduce sums in another order.
  reference = parallel_steps.run(config, 1, mesh=mesh_of(jax.devices()))
  assert_same_step(config, (multi_variables, multi['losses']),
                   (keyed(reference[0]), reference[1]))


def test_global_batch_must_divide_by_devices():
  with pytest.raises(ValueError, match='global batch size 6 does not divide by the 8 devices'):
    parallel.local_batch_size(6)
  assert parallel.local_batch_size(16) == 16
