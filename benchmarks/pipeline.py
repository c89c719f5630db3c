"""Training-sample throughput of the host pipeline, per worker and per pool.

  python benchmarks/pipeline.py --image-size 256 --seconds 10 --steps 60

Part 1 times one process (= one data worker) building whole training samples
as the workers do (augmentation, synthesis, and for stage 2 the SLIC labels)
for each generator. Part 2 times `pipeline.batches` with 1, 2 and 4 spawned
workers: total samples/s of batches delivered, after the pool has started.
"""

import argparse
import functools
import os
import sys
import tempfile
import time

import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import machine  # pylint: disable=g-import-not-at-top
from configs import bauer  # pylint: disable=g-import-not-at-top
from configs import mvtec  # pylint: disable=g-import-not-at-top
from twostage_jax import pipeline  # pylint: disable=g-import-not-at-top
from twostage_jax import synthesis  # pylint: disable=g-import-not-at-top
from twostage_jax.synthesis import samples  # pylint: disable=g-import-not-at-top

_NUM_NORMAL_IMAGES = 16


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


def _pool_rate(images: np.ndarray, factory: pipeline.SamplerFactory, workers: int,
               steps: int, batch_size: int) -> float:
  """Samples/s that `workers` processes deliver, timed from the first batch."""
  plan = pipeline.BatchPlan(num_images=len(images), global_batch_size=batch_size,
                            local_batch_size=batch_size, process_index=0, seed=0, stream=1)
  stream = pipeline.batches(images, factory, plan, 0, steps + 1, workers,
                            prefetch=2 * workers)
  next(stream)  # pool start-up and the workers' imports are not counted
  start = time.perf_counter()
  for _ in stream:
    pass
  return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image-size', type=int, default=256)
  parser.add_argument('--seconds', type=float, default=10.0,
                      help='measuring time per case in part 1')
  parser.add_argument('--steps', type=int, default=60,
                      help='batches per pool size in part 2 (stage 2: a quarter)')
  parser.add_argument('--batch-size', type=int, default=8)
  parser.add_argument('--workers', type=int, nargs='+', default=[1, 2, 4])
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

    print(f'\n2) spawned workers, batches of {args.batch_size}, samples/s after start-up '
          f'({os.cpu_count()} CPUs here)')
    print(f'{"case":<26}' + ''.join(f'{f"{w} worker(s)":>13}' for w in args.workers))
    for name, config, stage in cases[3:]:
      factory = functools.partial(samples.PseudoAnomalySampler, sources, config, stage)
      steps = args.steps if stage == 1 else max(args.steps // 4, 2)
      rates = [_pool_rate(images, factory, w, steps, args.batch_size) for w in args.workers]
      print(f'{name:<26}' + ''.join(f'{r:>13.1f}' for r in rates))


if __name__ == '__main__':
  main()
