"""Images/s loading a category from its image files versus from the tfds cache.

Both paths are the program's own (`config.data_cache` 'none' and 'tfds'): the
train and test splits of one category, decoded and resized from the files, or
read from the cache, which is built first (untimed) in a temporary folder.
Each path runs once untimed, so the files are in the OS page cache; then the
two alternate for --repeats rounds.

Usage:
  python benchmarks/data_read.py --data-dir /data/mvtec_ad --category bottle
  python benchmarks/data_read.py    # the built-in demo dataset

--source-size N times a temporary copy of the category resized to N x N, a
stand-in for full-size originals (MVTec AD's are 900 to 1024 pixels) when
only a downscaled copy is at hand.
"""

import argparse
from importlib import metadata
import os
import statistics
import tempfile
import time

import ml_collections
import numpy as np
import PIL
from PIL import Image


import machine
from configs import mvtec as mvtec_config
from twostage_jax import data
from twostage_jax.data import mvtec


def _resized_copy(data_dir: str, category: str, size: int, root: str) -> str:
  """Copies the category's files under `root`, resized to size x size."""
  folder = mvtec.category_dir(data_dir, category)
  files = mvtec.test_files(data_dir, category)
  masks = [path for path in files.mask_paths if path is not None]
  for path in (*mvtec.train_files(data_dir, category), *files.paths, *masks):
    target = os.path.join(root, category, path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with Image.open(os.path.join(folder, path)) as image:
      resample = (Image.Resampling.NEAREST if path.startswith('ground_truth')
                  else Image.Resampling.BILINEAR)
      image.resize((size, size), resample).save(target)
  return root


def _load(config: ml_collections.ConfigDict) -> tuple[np.ndarray, mvtec.TestSet]:
  """The category's train and test splits, the way a run loads them."""
  return data.category_train_images(config), data.category_test_set(config)


def _seconds(config: ml_collections.ConfigDict) -> float:
  start = time.perf_counter()
  _load(config)
  return time.perf_counter() - start


def _describe_files(data_dir: str, category: str, image_size: int) -> str:
  """Format, size and mode of the first training file, and whether it is resized."""
  first = os.path.join(mvtec.category_dir(data_dir, category),
                       mvtec.train_files(data_dir, category)[0])
  with Image.open(first) as image:
    resized = image.size != (image_size, image_size)
    return (f'{image.format} {image.width}x{image.height} {image.mode}, read at '
            f'{image_size}x{image_size} ({"resized" if resized else "no resize needed"})')


def _run(args: argparse.Namespace, data_dir: str, cache_dir: str) -> None:
  config = mvtec_config.get_config()
  config.update(data_dir=data_dir, category=args.category,
                image_size=args.image_size, cache_dir=cache_dir)
  folder_config = config.copy_and_resolve_references()
  folder_config.data_cache = 'none'
  cache_config = config.copy_and_resolve_references()
  cache_config.data_cache = 'tfds'

  train, test = _load(folder_config)
  count = len(train) + len(test.images)
  start = time.perf_counter()
  cached_train, cached_test = _load(cache_config)
  build = time.perf_counter() - start
  if not (np.array_equal(cached_train, train) and np.array_equal(cached_test.images, test.images)
          and np.array_equal(cached_test.masks, test.masks)):
    raise AssertionError('the cache returned other arrays than the image files')
  print(f'{args.category}: {len(train)} train + {len(test.images)} test images, '
        f'files {_describe_files(data_dir, args.category, args.image_size)}; '
        f'cache built and read once (untimed) in {build:.1f} s')

  times = {'image files': [], 'tfds cache': []}
  for _ in range(args.repeats):
    times['image files'].append(_seconds(folder_config))
    times['tfds cache'].append(_seconds(cache_config))
  header = f'{"source":<32}{"best s":>9}{"median s":>10}{"images/s":>10}'
  print(f'\n{args.repeats} rounds, images/s from the median\n{header}\n{"-" * len(header)}')
  rates = {}
  for name, seconds in times.items():
    median = statistics.median(seconds)
    rates[name] = count / median
    print(f'{name:<32}{min(seconds):>9.3f}{median:>10.3f}{rates[name]:>10.0f}')
  ratio = rates['tfds cache'] / rates['image files']
  print(f'tfds cache / image files: {ratio:.1f}x')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--data-dir', default='',
                      help="MVTec-layout folder; '' = the built-in demo dataset")
  parser.add_argument('--category', default='',
                      help="'' = the first category of the folder")
  parser.add_argument('--image-size', type=int, default=256)
  parser.add_argument('--repeats', type=int, default=5, help='timed rounds per source')
  parser.add_argument('--source-size', type=int, default=0,
                      help='time a copy of the files resized to this size; 0 = as they are')
  args = parser.parse_args()

  print(f'machine: {machine.describe()}, numpy {np.__version__}, pillow '
        f'{PIL.__version__}, tensorflow-datasets {metadata.version("tensorflow-datasets")}')
  data_dir = args.data_dir or data.ensure_demo_dataset(
      data.default_cache_dir(''), mvtec_config.get_config().demo)
  args.category = args.category or data.list_categories(data_dir)[0]
  with tempfile.TemporaryDirectory(prefix='data_read_') as scratch:
    if args.source_size:
      print(f'source: a copy of {data_dir}/{args.category} resized to '
            f'{args.source_size}x{args.source_size} (stand-in for full-size files)')
      data_dir = _resized_copy(data_dir, args.category, args.source_size,
                               os.path.join(scratch, 'data'))
    else:
      print(f'source: {data_dir}/{args.category}')
    _run(args, data_dir, os.path.join(scratch, 'cache'))


if __name__ == '__main__':
  main()
