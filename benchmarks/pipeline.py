"""Training-sample throughput of the host pipeline, per worker and per pool.

  python benchmarks/pipeline.py --image-size 256 --seconds 10 --steps 60

Part 1 times one process (= one data worker) building whole training samples
as the workers do (augmentation, synthesis, and for stage 2 the SLIC labels)
for each generator. Part 2 times `pipeline.batches` with 1, 2 and 4 spawned
workers: total samples/s of batches delivered, after the pool has started.
Beside each figure it times the same stream on grain (pip install grain), the
JAX ecosystem's data loader, and says whether both gave the same first and
last batch: it is the measurement behind keeping our own pool (docs/training.md, "Input
pipeline"). Without grain installed that column is skipped. Each figure is the
best of --repeats runs, ours and grain alternating, since other processes on a
shared machine slow whichever run they overlap.
"""

import argparse
import functools
import importlib.metadata
import importlib.util
import os
import tempfile
import time
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np


import machine
from configs import bauer
from configs import mvtec
from twostage_jax import synthesis
from twostage_jax.runtime import pipeline
from twostage_jax.synthesis import samples

_NUM_NORMAL_IMAGES = 16

Batches = Callable[..., Iterator[dict[str, np.ndarray]]]
# (samples/s, start-up s, first batch, last batch) of one timed stream.
_Run = tuple[float, float, dict[str, np.ndarray], dict[str, np.ndarray]]


def _normal_images(size: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 smooth random colour images standing in for defect-free photos."""
  images = []
  for _ in range(_NUM_NORMAL_IMAGES):
    noise = synthesis.perlin_noise((size, size), (4, 4), rng)
    tint = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
    image = tint + 0.2 * noise[..., None] + rng.normal(0.0, 0.02, (size, size, 3))
    images.append(np.clip(image * 255, 0, 255).astype(np.uint8))
  return np.stack(images)


def _cases(image_size: int) -> list[tuple[str, ml_collections.ConfigDict, int]]:
  """(name, config, stage) of every sample kind, at `image_size`."""

  def two_stage(**synthesis_overrides) -> ml_collections.ConfigDict:
    config = mvtec.get_config()
    config.image_size = image_size
    config.synthesis.update(synthesis_overrides)
    return config

  bauer_config = bauer.get_config()
  bauer_config.image_size = image_size
  return [
      ('Perlin only', two_stage(p_anomaly=1.0, p_perlin=1.0), 1),
      ('SAIM only', two_stage(p_anomaly=1.0, p_perlin=0.0), 1),
      ('Bauer patches', bauer_config, 1),
      ('mixed (config defaults)', two_stage(), 1),
      ('mixed + SLIC (stage 2)', two_stage(), 2),
  ]


def _per_process_rate(sampler: samples.PseudoAnomalySampler, images: np.ndarray,
                      seconds: float, seed: int) -> tuple[float, int, float]:
  """Builds samples for `seconds`; returns (samples/s, count, share anomalous)."""
  rng = np.random.default_rng(seed)
  count = anomalous = 0
  start = time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds:
    sample = sampler(images[count % len(images)].astype(np.float32) / 255.0, rng)
    anomalous += bool(sample['mask'].any())
    count += 1
  return count / elapsed, count, anomalous / max(count, 1)


class _StepBuilder:
  """grain's map function: builds batch `step` as our workers do, sampler made once."""

  def __init__(self, images: np.ndarray, make_sampler: pipeline.SamplerFactory,
               plan: pipeline.BatchPlan):
    self._images = images
    self._make_sampler = make_sampler
    self._plan = plan
    self._sample: pipeline.Sampler | None = None

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    if self._sample is None:
      self._sample = self._make_sampler()
    return pipeline.build_batch(self._images, self._sample, self._plan, int(step))


def _grain_batches(images: np.ndarray, make_sampler: pipeline.SamplerFactory,
                   plan: pipeline.BatchPlan, start_step: int, num_steps: int,
                   num_workers: int, prefetch: int) -> Iterator[dict[str, np.ndarray]]:
  """`pipeline.batches` on grain, yielding the same batches for any worker count.

  One element per step, built from `BatchPlan` as ours are: grain splits the
  steps over its workers and interleaves them back in order, and a resumed
  run starts the range at its step.
  """
  # Imported here: grain imports JAX, which our workers (that re-import this
  # script) must not load.
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags of its own
  dataset = grain.MapDataset.range(start_step, num_steps).map(
      _StepBuilder(images, make_sampler, plan))
  # No threads inside a process: one sample at a time per worker, as in ours.
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if num_workers:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=max(1, -(-prefetch // num_workers))))
  iterator = iter(dataset)
  try:
    yield from iterator
  finally:
    iterator.close()


def _pool_rate(batches: Batches, images: np.ndarray, factory: pipeline.SamplerFactory,
               workers: int, steps: int, batch_size: int) -> _Run:
  """Times `batches` from its first to its last batch.

  Start-up (spawning, the workers' imports) and shutdown are not counted: they
  happen once per training stage.
  """
  plan = pipeline.BatchPlan(num_images=len(images), global_batch_size=batch_size,
                            local_batch_size=batch_size, process_index=0, seed=0, stream=1)
  start = time.perf_counter()
  stream = batches(images, factory, plan, 0, steps + 1, workers, prefetch=2 * workers)
  first = last = next(stream)
  start_up = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    last = next(stream)
  rate = steps * batch_size / (time.perf_counter() - start)
  stream.close()
  return rate, start_up, first, last


def _same(x: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> bool:
  """Whether two batches hold the same arrays: grain must not change the stream."""
  return x.keys() == y.keys() and all(
      x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image-size', type=int, default=256)
  parser.add_argument('--seconds', type=float, default=10.0,
                      help='measuring time per case in part 1')
  parser.add_argument('--steps', type=int, default=60,
                      help='batches per pool size in part 2 (stage 2: a quarter)')
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--workers', type=int, nargs='+', default=[1, 2, 4])
  parser.add_argument('--repeats', type=int, default=2,
                      help='measurements per pool size in part 2, of which the best is shown')
  args = parser.parse_args()

  print(f'machine: {machine.describe()}, numpy {np.__version__}')
  print(synthesis.describe_sources(''))
  size = args.image_size
  images = _normal_images(size, np.random.default_rng(0))
  cases = _cases(size)

  with tempfile.TemporaryDirectory(prefix='source_store_') as cache_dir:
    start = time.perf_counter()
    synthesis_config = mvtec.get_config().synthesis
    sources = synthesis.build_source_store(
        '', size, synthesis_config.saim_n_segments, synthesis_config.saim_compactness,
        synthesis_config.saim_sigma, cache_dir, num_processes=os.cpu_count() or 1)
    print(f'built the source store of the {len(sources)} sources in '
          f'{time.perf_counter() - start:.1f} s (training does this once per machine)')

    print(f'\n1) one process, {size}x{size}, {args.seconds:g} s per case')
    header = f'{"case":<26}{"samples":>9}{"anomalous":>11}{"samples/s":>11}{"ms/sample":>11}'
    print(header)
    print('-' * len(header))
    for seed, (name, config, stage) in enumerate(cases):
      sampler = samples.PseudoAnomalySampler(sources, config, stage)
      rate, count, anomalous = _per_process_rate(sampler, images, args.seconds, seed)
      print(f'{name:<26}{count:>9d}{anomalous:>11.0%}{rate:>11.1f}{1e3 / rate:>11.2f}')

    pipelines: dict[str, Batches] = {'ours': pipeline.batches}
    print(f'\n2) spawned workers, batches of {args.batch_size}, samples/s after start-up '
          f'({os.cpu_count()} CPUs here), best of {args.repeats}')
    if importlib.util.find_spec('grain') is not None:
      pipelines['grain'] = _grain_batches
      print(f'ours = pipeline.batches; grain {importlib.metadata.version("grain")} = the same '
            'stream on grain.MapDataset + mp_prefetch; start = seconds to the first batch')
      print(f'{"case":<26}{"workers":>8}{"ours":>9}{"grain":>9}{"grain/ours":>12}'
            f'{"start ours":>12}{"start grain":>13}  same batches')
    else:
      print('grain is not installed (pip install grain): its column is skipped')
      print(f'{"case":<26}{"workers":>8}{"ours":>9}{"start ours":>12}')
    for name, config, stage in cases[3:]:
      factory = functools.partial(samples.PseudoAnomalySampler, sources, config, stage)
      steps = args.steps if stage == 1 else max(args.steps // 4, 2)
      for w in args.workers:
        best: dict[str, _Run] = {}
        for _ in range(args.repeats):  # alternating, so other load hits both alike
          for label, batches in pipelines.items():
            run = _pool_rate(batches, images, factory, w, steps, args.batch_size)
            if label not in best or run[0] > best[label][0]:
              best[label] = run
        ours, ours_start, first, last = best['ours']
        row = f'{name:<26}{w:>8d}{ours:>9.1f}'
        if 'grain' not in best:
          print(f'{row}{ours_start:>12.1f}', flush=True)
          continue
        rate, start_up, grain_first, grain_last = best['grain']
        same = _same(first, grain_first) and _same(last, grain_last)
        print(f'{row}{rate:>9.1f}{rate / ours:>11.2f}x{ours_start:>12.1f}{start_up:>13.1f}'
              f'  {"yes" if same else "NO"}', flush=True)


if __name__ == '__main__':
  main()
