"""Data parallelism: 8 devices, and 2 processes x 4 devices, give the 1-device step."""

import functools
import os
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from twostage_jax.runtime import parallel
from twostage_jax.runtime.parallel import DATA_AXIS

import child_process  # tests/child_process.py
import parallel_steps  # tests/parallel_steps.py

ROOT = child_process.ROOT


def mesh_of(devices):
  return Mesh(np.array(devices), (DATA_AXIS,))


CONFIG = parallel_steps.small_config('')


@functools.cache
def float64_step(optimizer, num_devices, batch_offset=0):
  """(keyed variables, losses) of one float64 step of CONFIG with 'sgd' or the config's 'adam'.

  On the first `num_devices` devices, on the batch `batch_offset` of the
  stream; computed once per set of arguments (pass them positionally).
  """
  tx = parallel_steps.SGD if optimizer == 'sgd' else None
  variables, losses = parallel_steps.run(CONFIG, 1, tx=tx,
                                         mesh=mesh_of(jax.devices()[:num_devices]),
                                         batch_offset=batch_offset)
  return parallel_steps.keyed(variables), losses


def assert_same_step(got, want):
  """(keyed variables, losses) pairs of `parallel_steps.run`: the same losses and changes.

  The losses are forward values of the same float64 computation in two
  layouts: LAYOUT_TOLERANCE bounds them as it bounds the step
  (tests/parallel_steps.py).
  """
  np.testing.assert_allclose(got[1], want[1], rtol=parallel_steps.LAYOUT_TOLERANCE)
  parallel_steps.assert_same_change(parallel_steps.initial_variables(CONFIG), got[0], want[0])


@pytest.mark.slow
def test_eight_devices_match_one_device():
  assert jax.device_count() == 8, 'tests/conftest.py should simulate 8 CPU devices'
  one = float64_step('sgd', 1)
  assert_same_step(float64_step('sgd', 8), one)
  # The steps moved every array, so the comparison is not vacuous.
  fresh = parallel_steps.initial_variables(CONFIG)
  for name, value in one[0].items():
    assert np.abs(value - fresh[name]).max() > 1e-4, name
  # A step on another batch: what a wrong layout would look like.
  parallel_steps.assert_changed_unlike(fresh, float64_step('sgd', 1, 1)[0], one[0])


@pytest.mark.slow
def test_adam_step_matches_where_the_gradient_is_above_rounding():
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
  lr = CONFIG.train.learning_rate
  (params8, losses8), (params1, losses1) = float64_step('adam', 8), float64_step('adam', 1)
  np.testing.assert_allclose(losses8, losses1, rtol=parallel_steps.LAYOUT_TOLERANCE)
  # The gradient, from the SGD step of the test above: p - lr_sgd * g.
  fresh = parallel_steps.initial_variables(CONFIG)
  grads = {k: (fresh[k] - v) / parallel_steps.SGD_RATE for k, v in float64_step('sgd', 1)[0].items()
           if "'params'" in k}
  excluded = total = 0
  for name, g in grads.items():
    clear = np.abs(g) > 1e-4 * np.abs(g).max()
    excluded += int((~clear).sum())
    total += g.size
    np.testing.assert_allclose(params8[name][clear], params1[name][clear],
                               rtol=0, atol=1e-3 * lr, err_msg=name)
  assert excluded < 0.01 * total


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  out = tmp_path / 'multi.npz'
  coordinator = f'localhost:{child_process.free_port()}'
  commands = [[sys.executable, os.path.join(ROOT, 'tests', 'parallel_steps.py'),
               CONFIG.cache_dir, str(out), coordinator, '2', str(i)] for i in range(2)]
  for finished in child_process.run_together(commands, [child_process.environment(4)] * 2,
                                             tmp_path):
    assert finished.returncode == 0, finished.stderr[-3000:]
  multi = np.load(out)
  multi_variables = {name: multi[name] for name in multi.files if name != 'losses'}
  # Reference: one process with the same 8-device layout, in float64 as the
  # processes were; the cross-process all-reduce sums in another order.
  assert_same_step((multi_variables, multi['losses']), float64_step('sgd', 8))


def test_global_batch_must_divide_by_devices():
  with pytest.raises(ValueError, match='global batch size 6 does not divide by the 8 devices'):
    parallel.local_batch_size(6)
  assert parallel.local_batch_size(16) == 16
