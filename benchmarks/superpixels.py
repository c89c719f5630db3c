"""JAX SLIC (twostage_jax/methods/two_stage/device_slic.py) against scikit-image's: agreement and time.

  python benchmarks/superpixels.py
  python benchmarks/superpixels.py --data-dir /data/mvtec_ad --categories bottle grid

On every test image of each category, at configs/mvtec.py's image size and
`refine` SLIC settings, with connectivity off and on (each side its own
rule): the share of pixels whose labels agree after one-to-one matching of
ids (Hungarian matching on the overlap table), the adjusted Rand index, how
many images agree exactly, and seconds per image. skimage segments the uint8
images one at a time as the host pipeline does; JAX segments batches of
--batch-size after an untimed call that compiles. For scale, the last
column compares skimage on float32 input (it then computes in float32) with
skimage on the uint8 input (float64): the effect of float32 alone.
"""

import argparse
import os
import time

import jax
import numpy as np
from skimage import segmentation
from sklearn import metrics

import machine
from configs import mvtec as mvtec_config
from twostage_jax.data import mvtec
from twostage_jax.methods.two_stage import device_slic

_DEFAULT_DATA_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data', 'mvtec_ad')


def _skimage(images: np.ndarray, settings: dict, connectivity: bool
             ) -> tuple[np.ndarray, float]:
  """skimage's labels of each image, and seconds per image."""
  start = time.perf_counter()
  labels = np.stack([segmentation.slic(image, enforce_connectivity=connectivity, start_label=0,
                                       channel_axis=-1, **settings) for image in images])
  return labels, (time.perf_counter() - start) / len(images)


def _jax(images: np.ndarray, settings: dict, connectivity: bool, batch_size: int
         ) -> tuple[np.ndarray, float]:
  """The JAX labels in batches (the last one padded), and seconds per image."""
  count = len(images)
  padded = images[np.arange(count + -count % batch_size) % count]
  batches = [jax.device_put(padded[i:i + batch_size]) for i in range(0, len(padded), batch_size)]
  segment = lambda batch: device_slic.slic_labels(
      batch, enforce_connectivity=connectivity, **settings).block_until_ready()
  segment(batches[0])
  start = time.perf_counter()
  labels = [np.asarray(segment(batch)) for batch in batches]
  return np.concatenate(labels)[:count], (time.perf_counter() - start) / count


def _agreement(ours: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per image: matched pixel agreement and adjusted Rand index."""
  matched = np.array([device_slic.matched_agreement(a, b) for a, b in zip(ours, reference)])
  rand = np.array([metrics.adjusted_rand_score(b.ravel(), a.ravel())
                   for a, b in zip(ours, reference)])
  return matched, rand


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data-dir', default=_DEFAULT_DATA_DIR, help='MVTec-layout folder')
  parser.add_argument('--categories', nargs='+', default=['bottle', 'grid'])
  parser.add_argument('--batch-size', type=int, default=8, help='images per JAX call')
  args = parser.parse_args()

  config = mvtec_config.get_config()
  settings = {key: config.refine[key] for key in ('n_segments', 'compactness', 'sigma')}
  print(f'machine: {machine.describe()}, jax {jax.__version__} on {jax.default_backend()}')
  print(f'SLIC {settings}, {config.image_size}x{config.image_size}, '
        f'JAX batches of {args.batch_size}')
  header = (f'{"category":<9}{"connect":>8}{"images":>7}{"agree mean":>11}{"min":>8}'
            f'{"ARI mean":>9}{"min":>8}{"exact":>6}{"skimage s":>10}{"jax s":>8}'
            f'{"f32 skimage agree":>18}')
  print(f'{header}\n{"-" * len(header)}')
  for category in args.categories:
    images = mvtec.load_test_set(args.data_dir, category, config.image_size).images
    for connectivity in (False, True):
      reference, skimage_s = _skimage(images, settings, connectivity)
      ours, jax_s = _jax(images, settings, connectivity, args.batch_size)
      matched, rand = _agreement(ours, reference)
      float32, _ = _skimage(images.astype(np.float32) / np.float32(255), settings, connectivity)
      float32_matched, _ = _agreement(float32, reference)
      print(f'{category:<9}{"on" if connectivity else "off":>8}{len(images):>7}'
            f'{matched.mean():>11.5f}{matched.min():>8.4f}{rand.mean():>9.5f}{rand.min():>8.4f}'
            f'{int((matched == 1).sum()):>6}{skimage_s:>10.3f}{jax_s:>8.3f}'
            f'{float32_matched.mean():>18.5f}')


if __name__ == '__main__':
  main()
