"""Pseudo-anomaly synthesis throughput of one process (= one data worker).

Usage:
  python benchmarks/pipeline.py --image-size 256 --seconds 10 \
      --anomaly-source-dir /data/dtd/images
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import machine  # pylint: disable=g-import-not-at-top
from configs import mvtec  # pylint: disable=g-import-not-at-top
from twostage_jax import synthesis  # pylint: disable=g-import-not-at-top

_NUM_NORMAL_IMAGES = 16


def _normal_images(size: int, rng: np.random.Generator) -> list[np.ndarray]:
  """Smooth random colour images standing in for defect-free photos."""
  images = []
  for _ in range(_NUM_NORMAL_IMAGES):
    noise = synthesis.perlin_noise((size, size), (4, 4), rng)
    tint = rng.uniform(0.2, 0.8, size=3).astype(np.float32)
    image = tint + 0.2 * noise[..., None] + rng.normal(
        0.0, 0.02, (size, size, 3)).astype(np.float32)
    images.append(np.clip(image, 0.0, 1.0).astype(np.float32))
  return images


def _warm_slic_cache(synthesizer: synthesis.PseudoAnomalySynthesizer,
                     sources: list[np.ndarray],
                     n_segments: tuple[int, ...]) -> float:
  """Fills the synthesizer's SLIC cache; returns the seconds it took."""
  start = time.perf_counter()
  for source in sources:
    for n in n_segments:
      synthesizer.slic_cache.labels(source, n)
  return time.perf_counter() - start


def _samples_per_second(synthesizer: synthesis.PseudoAnomalySynthesizer,
                        images: list[np.ndarray], seconds: float,
                        seed: int) -> tuple[float, int, float]:
  """Runs the synthesizer for `seconds`; returns (rate, count, anomalous)."""
  rng = np.random.default_rng(seed)
  count = 0
  anomalous = 0
  start = time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds:
    _, mask = synthesizer(images[count % len(images)], rng)
    anomalous += bool(mask.any())
    count += 1
  return count / elapsed, count, anomalous / max(count, 1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image-size', type=int, default=256)
  parser.add_argument('--seconds', type=float, default=10.0,
                      help='measuring time per case')
  parser.add_argument('--anomaly-source-dir', default='',
                      help="texture folder; '' = built-in set")
  args = parser.parse_args()

  print(f'machine: {machine.describe()}, numpy {np.__version__}')
  print(synthesis.describe_sources(args.anomaly_source_dir))
  sources = synthesis.load_anomaly_sources(args.anomaly_source_dir,
                                           args.image_size)
  images = _normal_images(args.image_size, np.random.default_rng(0))
  defaults = mvtec.get_config().synthesis

  with tempfile.TemporaryDirectory(prefix='slic_cache_') as slic_dir:
    warm = synthesis.PseudoAnomalySynthesizer(sources, defaults, slic_dir)
    seconds = _warm_slic_cache(warm, sources, defaults.saim_n_segments)
    print('warmed the SLIC cache first (temporary folder): '
          f'{len(sources) * len(defaults.saim_n_segments)} label maps '
          f'({len(sources)} sources x n_segments {defaults.saim_n_segments}) '
          f'in {seconds:.1f} s; every case reloads it from disk before timing')

    cases = (
        ('Perlin only', dict(p_anomaly=1.0, p_perlin=1.0)),
        ('SAIM only', dict(p_anomaly=1.0, p_perlin=0.0)),
        ('mixed (config defaults)', {}),
    )
    print(f'\none process, {args.image_size}x{args.image_size}, '
          f'{args.seconds:g} s per case')
    header = (f'{"case":<26}{"p_anomaly":>10}{"p_perlin":>10}{"samples":>9}'
              f'{"anomalous":>11}{"samples/s":>11}{"ms/sample":>11}')
    print(header)
    print('-' * len(header))
    for seed, (name, overrides) in enumerate(cases):
      config = mvtec.get_config().synthesis
      config.update(overrides)
      synthesizer = synthesis.PseudoAnomalySynthesizer(sources, config,
                                                       slic_dir)
      _warm_slic_cache(synthesizer, sources, config.saim_n_segments)
      rate, count, anomalous = _samples_per_second(
          synthesizer, images, args.seconds, seed)
      print(f'{name:<26}{config.p_anomaly:>10.2f}{config.p_perlin:>10.2f}'
            f'{count:>9d}{anomalous:>11.0%}{rate:>11.1f}{1e3 / rate:>11.2f}')


if __name__ == '__main__':
  main()
