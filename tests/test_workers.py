"""Worker pools: a dead worker ends the iteration, errors propagate, workers stay lean.

The samplers here are picklable classes of this module: the spawned workers
import it, so it must not import JAX either.
"""

import functools
import multiprocessing
import os
import resource
import signal
import sys
import threading
import time

import numpy as np
import pytest

from configs import demo
from twostage_jax import synthesis
from twostage_jax.methods.two_stage import host_slic
from twostage_jax.runtime import pipeline

# The requirement: a dead worker ends the iteration within 10 s of its death.
DEADLINE_S = 10.0
HEAVY_MODULES = ('jax', 'flax', 'orbax.checkpoint')
DEATHS = [(signal.SIGKILL, 'killed (SIGKILL), e.g. by the out-of-memory killer'),
          (signal.SIGSEGV, 'crashed in native code (SIGSEGV)')]


class SlowSampler:
  """Announces its pid in `folder` once it is inside a sample, then works slowly."""

  def __init__(self, folder: str, seconds: float):
    self._folder = folder
    self._seconds = seconds

  def __call__(self, image, rng):
    with open(os.path.join(self._folder, str(os.getpid())), 'w'):
      pass
    time.sleep(self._seconds)
    return {'image': image}


class FailingSampler:
  """Raises in its constructor or on its first sample."""

  def __init__(self, where: str):
    if where == 'factory':
      raise KeyError('no anomaly sources under /nowhere')
    self._where = where

  def __call__(self, image, rng):
    if self._where == 'exit':
      os._exit(3)  # pylint: disable=protected-access
    raise ValueError(f'cannot sample an image of shape {image.shape}')


class ModuleReportingSampler:
  """The real two-stage sampler, plus its process id and which heavy modules it has loaded."""

  def __init__(self, make_sampler):
    self._sample = make_sampler()

  def __call__(self, image, rng):
    sample = self._sample(image, rng)
    sample['pid'] = np.int64(os.getpid())
    sample['heavy'] = np.array([name in sys.modules for name in HEAVY_MODULES])
    return sample


@pytest.fixture(autouse=True)
def no_core_dumps():
  """Workers inherit the limit, so a SIGSEGV test leaves no core file behind."""
  limits = resource.getrlimit(resource.RLIMIT_CORE)
  resource.setrlimit(resource.RLIMIT_CORE, (0, limits[1]))
  yield
  resource.setrlimit(resource.RLIMIT_CORE, limits)


@pytest.fixture(autouse=True)
def cleans_up():
  """Every pool, also one that failed, leaves no process and no shared memory."""
  before = shared_segments()
  yield
  assert not multiprocessing.active_children()
  assert shared_segments() - before == set()


def shared_segments() -> set[str]:
  if not os.path.isdir('/dev/shm'):
    return set()
  prefix = pipeline.segment_prefix()
  return {name for name in os.listdir('/dev/shm') if name.startswith(prefix)}


@pytest.fixture(scope='module')
def images():
  return np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)


def plan():
  return pipeline.BatchPlan(num_images=8, global_batch_size=2, local_batch_size=2,
                            process_index=0, seed=3, stream=1)


def real_sampler_factory(stage):
  config = demo.get_config()
  store = synthesis.SourceStore.from_images(
      synthesis.load_anomaly_sources('', 32)[:4], config.synthesis.saim_n_segments,
      config.synthesis.saim_compactness, config.synthesis.saim_sigma)
  return functools.partial(synthesis.PseudoAnomalySampler, store, config, stage)


def wait_for_file(folder, timeout_s: float = 120.0) -> int:
  """The pid a SlowSampler announced in `folder`."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    names = os.listdir(folder)
    if names:
      return int(names[0])
    time.sleep(0.05)
  raise TimeoutError('no worker started sampling')


def assert_names_the_worker(error, pool_name, pid, signal_text):
  message = str(error)
  assert error.pid == pid
  assert f'{pool_name} worker {error.index} (pid {pid})' in message
  assert signal_text in message


@pytest.mark.parametrize('sig,why', DEATHS, ids=['SIGKILL', 'SIGSEGV'])
def test_a_pipeline_worker_dying_mid_sample_ends_the_iteration(tmp_path, images, sig, why):
  stream = pipeline.batches(images, functools.partial(SlowSampler, str(tmp_path), 60.0),
                            plan(), 0, 4, num_workers=2, prefetch=2)
  killed = {}

  def kill_a_busy_worker():
    killed['pid'] = wait_for_file(tmp_path)
    killed['time'] = time.monotonic()
    os.kill(killed['pid'], sig)

  threading.Thread(target=kill_a_busy_worker, daemon=True).start()
  with pytest.raises(pipeline.WorkerDied) as raised:
    next(stream)
  assert time.monotonic() - killed['time'] < DEADLINE_S
  assert_names_the_worker(raised.value, 'input pipeline', killed['pid'], why)
  assert raised.value.exitcode == -sig


@pytest.mark.parametrize('sig,why', DEATHS, ids=['SIGKILL', 'SIGSEGV'])
def test_a_slic_worker_dying_mid_labelling_ends_the_iteration(sig, why):
  images = np.random.default_rng(1).integers(0, 256, (48, 160, 160, 3), dtype=np.uint8)
  stream = host_slic.superpixel_batches(images, demo.get_config(), batch_size=4,
                                              num_workers=2)
  next(stream)  # the workers are up and label the next batches
  victim = multiprocessing.active_children()[0].pid
  killed_at = time.monotonic()
  os.kill(victim, sig)
  with pytest.raises(pipeline.WorkerDied) as raised:
    for _ in stream:
      pass
  assert time.monotonic() - killed_at < DEADLINE_S
  assert_names_the_worker(raised.value, 'SLIC', victim, why)


def test_a_worker_that_exits_is_reported_with_its_exit_code(images):
  stream = pipeline.batches(images, functools.partial(FailingSampler, 'exit'), plan(), 0, 4,
                            num_workers=1, prefetch=1)
  with pytest.raises(pipeline.WorkerDied, match=r'input pipeline worker 0 \(pid \d+\) '
                                                r'exited with code 3'):
    next(stream)


@pytest.mark.parametrize('where,error,message', [
    ('sample', ValueError, r'cannot sample an image of shape \(32, 32, 3\)'),
    ('factory', KeyError, 'no anomaly sources under /nowhere'),
])
def test_an_exception_in_a_worker_propagates_with_its_message(images, where, error, message):
  stream = pipeline.batches(images, functools.partial(FailingSampler, where), plan(), 0, 4,
                            num_workers=2, prefetch=2)
  with pytest.raises(error, match=message) as raised:
    next(stream)
  assert isinstance(raised.value.__cause__, pipeline.WorkerTraceback)
  assert os.path.basename(__file__) in str(raised.value.__cause__)  # where it was raised


def test_pipeline_workers_import_neither_jax_nor_flax_nor_orbax(images):
  factory = functools.partial(ModuleReportingSampler, real_sampler_factory(stage=2))
  stream = pipeline.batches(images, factory, plan(), 0, 4, num_workers=2, prefetch=2)
  reports = list(stream)
  pids = {int(pid) for batch in reports for pid in batch['pid']}
  assert len(pids) == 2 and os.getpid() not in pids  # both workers sampled
  for batch in reports:
    assert not batch['heavy'].any(), dict(zip(HEAVY_MODULES, batch['heavy'].any(0)))
    assert set(batch) == {'image', 'mask', 'labels', 'pid', 'heavy'}


@pytest.mark.skipif(not os.path.isdir('/proc/self'), reason='reads /proc/<pid>/maps')
def test_slic_workers_do_not_load_jax():
  images = np.random.default_rng(2).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  stream = host_slic.superpixel_batches(images, demo.get_config(), batch_size=4,
                                              num_workers=2)
  next(stream)  # the workers have imported what labelling needs
  workers = multiprocessing.active_children()
  assert len(workers) == 2
  for worker in workers:
    with open(f'/proc/{worker.pid}/maps') as maps:
      mapped = maps.read()
    assert 'jaxlib' not in mapped and 'xla_extension' not in mapped  # flax, orbax need it
  stream.close()


def test_pooled_slic_labels_equal_serial_ones():
  images = np.random.default_rng(3).integers(0, 256, (19, 32, 32, 3), dtype=np.uint8)
  config = demo.get_config()
  serial = list(host_slic.superpixel_batches(images, config, 5, num_workers=0))
  pooled = list(host_slic.superpixel_batches(images, config, 5, num_workers=2))
  assert [b.shape for b in pooled] == [(5, 32, 32)] * 3 + [(4, 32, 32)]
  for x, y in zip(serial, pooled, strict=True):
    assert y.dtype == np.int32
    np.testing.assert_array_equal(x, y)


def test_pool_answers_in_submission_order_across_workers():
  # Each worker's function is functools.partial(pow): task (n, 2) answers n ** 2.
  with pipeline.WorkerPool(3, functools.partial, (pow,), 'test') as pool:
    assert len(set(pool.pids)) == 3
    for n in range(7):
      pool.submit(n, 2)
    assert [pool.result() for _ in range(7)] == [n ** 2 for n in range(7)]
    with pytest.raises(RuntimeError, match='no task is pending'):
      pool.result()
