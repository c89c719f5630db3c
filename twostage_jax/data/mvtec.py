"""Reader for folders in the MVTec AD layout, for any category name.

    <data_dir>/<category>/train/good/*.png
    <data_dir>/<category>/test/<defect>/*.png        ('good' = defect-free)
    <data_dir>/<category>/ground_truth/<defect>/<name>_mask.png

Every problem with the folder raises `DatasetError` naming what is wrong and
where, so a user with a misplaced download sees the cause, not a traceback
from deep inside numpy.
"""

from collections.abc import Callable, Sequence
import concurrent.futures
import dataclasses
import os
from typing import TypeVar

import numpy as np

from twostage_jax.data import images
from twostage_jax.data.errors import DatasetError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
GOOD = 'good'

_T = TypeVar('_T')
_R = TypeVar('_R')


@dataclasses.dataclass(frozen=True)
class TestSet:
  """The test split of one category, one entry per image in file order.

  Attributes:
    images: uint8 (N, H, W, 3).
    masks: bool (N, H, W); all False for defect-free images.
    labels: int8 (N,); 1 = defective.
    paths: paths relative to the category folder, e.g. 'test/crack/000.png'.
    defect_types: the defect folder of each image ('good' for normal ones).
  """
  __test__ = False  # Not a pytest test class despite its name.

  images: np.ndarray
  masks: np.ndarray
  labels: np.ndarray
  paths: tuple[str, ...]
  defect_types: tuple[str, ...]


def _is_visible(name: str) -> bool:
  return not name.startswith('.')


def _image_names(folder: str) -> list[str]:
  """Sorted names of the image files in `folder` (hidden files ignored)."""
  return sorted(
      name for name in os.listdir(folder)
      if _is_visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)
      and os.path.isfile(os.path.join(folder, name)))


def _subfolders(folder: str) -> list[str]:
  return sorted(
      name for name in os.listdir(folder)
      if _is_visible(name) and os.path.isdir(os.path.join(folder, name)))


def _parallel_map(fn: Callable[[_T], _R], items: Sequence[_T]) -> list[_R]:
  """`fn` over `items` in threads (PIL decodes without the GIL), in order."""
  with concurrent.futures.ThreadPoolExecutor() as pool:
    return list(pool.map(fn, items))


def _check_data_dir(data_dir: str) -> None:
  if not os.path.isdir(data_dir):
    raise DatasetError(f'data_dir {data_dir} does not exist or is not a '
                       'folder; expected an MVTec AD layout folder')


def list_categories(data_dir: str) -> list[str]:
  """Sorted names of the folders in `data_dir` that have train/good."""
  _check_data_dir(data_dir)
  return [
      name for name in _subfolders(data_dir)
      if os.path.isdir(os.path.join(data_dir, name, 'train', GOOD))
  ]


def _category_dir(data_dir: str, category: str) -> str:
  """The category's folder, or an error listing the categories present."""
  _check_data_dir(data_dir)
  folder = os.path.join(data_dir, category)
  if not os.path.isdir(folder):
    existing = ', '.join(list_categories(data_dir)) or 'none'
    raise DatasetError(f'category {category!r} not found: no folder {folder} '
                       f'(categories in {data_dir}: {existing})')
  return folder


def load_train_images(data_dir: str, category: str,
                      image_size: int) -> np.ndarray:
  """All defect-free training images, uint8 (N, image_size, image_size, 3)."""
  folder = os.path.join(_category_dir(data_dir, category), 'train', GOOD)
  if not os.path.isdir(folder):
    raise DatasetError(f'no training images: folder {folder} does not exist')
  names = _image_names(folder)
  if not names:
    raise DatasetError(f'no training images in {folder} (looked for '
                       f'{", ".join(IMAGE_EXTENSIONS)} files)')
  paths = [os.path.join(folder, name) for name in names]
  return np.stack(_parallel_map(lambda p: images.read_rgb(p, image_size),
                                paths))


def _mask_path(category_dir: str, defect: str, image_name: str) -> str:
  """The mask of a defective image; reports the expected .png if absent."""
  stem = os.path.splitext(image_name)[0]
  base = os.path.join(category_dir, 'ground_truth', defect, f'{stem}_mask')
  for extension in IMAGE_EXTENSIONS:
    if os.path.isfile(base + extension):
      return base + extension
  image_path = os.path.join(category_dir, 'test', defect, image_name)
  raise DatasetError(f'defective test image {image_path} has no mask: '
                     f'expected {base}.png')


def _read_mask_checked(image_path: str, mask_path: str,
                       image_size: int) -> np.ndarray:
  """Reads a mask after checking it was drawn for an image of the same size."""
  image_hw = images.image_size_of(image_path)
  mask_hw = images.image_size_of(mask_path)
  if image_hw != mask_hw:
    raise DatasetError(
        f'mask {mask_path} has size (height, width) {mask_hw} but its image '
        f'{image_path} has size {image_hw}')
  return images.read_mask(mask_path, image_size)


def load_test_set(data_dir: str, category: str, image_size: int) -> TestSet:
  """The test split: images, pixel masks and labels, in sorted folder order."""
  category_dir = _category_dir(data_dir, category)
  test_dir = os.path.join(category_dir, 'test')
  if not os.path.isdir(test_dir):
    raise DatasetError(f'no test images: folder {test_dir} does not exist')

  paths, defect_types, mask_paths = [], [], []
  for defect in _subfolders(test_dir):
    for name in _image_names(os.path.join(test_dir, defect)):
      paths.append(f'test/{defect}/{name}')
      defect_types.append(defect)
      mask_paths.append(None if defect == GOOD else
                        _mask_path(category_dir, defect, name))
  if not paths:
    raise DatasetError(f'no test images in the subfolders of {test_dir}')

  def read(index: int) -> tuple[np.ndarray, np.ndarray]:
    image_path = os.path.join(category_dir, paths[index])
    image = images.read_rgb(image_path, image_size)
    mask_path = mask_paths[index]
    if mask_path is None:
      mask = np.zeros((image_size, image_size), dtype=bool)
    else:
      mask = _read_mask_checked(image_path, mask_path, image_size)
    return image, mask

  pairs = _parallel_map(read, range(len(paths)))
  return TestSet(
      images=np.stack([image for image, _ in pairs]),
      masks=np.stack([mask for _, mask in pairs]),
      labels=np.array([d != GOOD for d in defect_types], dtype=np.int8),
      paths=tuple(paths),
      defect_types=tuple(defect_types))
