"""Where a run's images come from: the configured folder or the demo set.

Either is read through the tfds cache or straight from the image files, as
`config.data_cache` says.
"""

import types

import ml_collections
import numpy as np

from twostage_jax.data import cache
from twostage_jax.data import demo
from twostage_jax.data import mvtec

# Values of `config.data_cache`: build and read the tfds cache, or decode the
# image files on every run.
DATA_CACHES = ('tfds', 'none')


def resolve_data_dir(config: ml_collections.ConfigDict) -> str:
  """`config.data_dir`, or the built-in demo set (generated on first use) when ''."""
  if config.data_dir:
    return config.data_dir
  if config.category not in demo.DEMO_CATEGORIES:
    raise ValueError(
        f'category {config.category!r} is not in the built-in demo dataset '
        f'(categories: {", ".join(demo.DEMO_CATEGORIES)}); set --config.data_dir '
        'to use your own data')
  return demo.ensure_demo_dataset(cache.default_cache_dir(config.cache_dir), config.demo)


def _tfds_cache(config: ml_collections.ConfigDict) -> types.ModuleType | None:
  """The tfds cache module when `config.data_cache` selects it, else None.

  Imported here, on first use, because tensorflow_datasets takes about half a
  second to import, which every process importing `twostage_jax.data` (the
  data workers too) would otherwise pay.

  Raises:
    ValueError: `config.data_cache` is not one of DATA_CACHES.
  """
  if config.data_cache not in DATA_CACHES:
    raise ValueError(f'config.data_cache = {config.data_cache!r} must be one of '
                     f'{", ".join(map(repr, DATA_CACHES))}')
  if config.data_cache == 'none':
    return None
  from twostage_jax.data import tfds_cache  # pylint: disable=g-import-not-at-top
  return tfds_cache


def category_train_images(config: ml_collections.ConfigDict) -> np.ndarray:
  """The configured category's training images, uint8 (N, S, S, 3), S = image_size.

  The same array whether it comes from the tfds cache (built from the folder
  on first use) or from the image files.
  """
  data_dir = resolve_data_dir(config)
  tfds_cache = _tfds_cache(config)
  if tfds_cache is None:
    return mvtec.load_train_images(data_dir, config.category, config.image_size)
  return tfds_cache.load_train_images(data_dir, config.category, config.image_size,
                                      cache.default_cache_dir(config.cache_dir))


def category_test_set(config: ml_collections.ConfigDict) -> mvtec.TestSet:
  """The configured category's test split, from the tfds cache or the files."""
  data_dir = resolve_data_dir(config)
  tfds_cache = _tfds_cache(config)
  if tfds_cache is None:
    return mvtec.load_test_set(data_dir, config.category, config.image_size)
  return tfds_cache.load_test_set(data_dir, config.category, config.image_size,
                                  cache.default_cache_dir(config.cache_dir))


def check_test_split(config: ml_collections.ConfigDict) -> None:
  """Checks the configured category's test split before any training.

  Its problems would otherwise surface only at evaluation, after both stages
  trained. Reads file listings, image headers and the masks, not the images,
  so it takes a fraction of loading the split. `config.category` names one
  category; for 'all', check each category's config.

  Raises:
    DatasetError: naming the offending file or folder: a defective image
      without a mask, a mask of another size than its image or all zero,
      images the reader would leave out, or a split without defect-free or
      without defective images.
  """
  mvtec.check_test_folder(resolve_data_dir(config), config.category)
