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
# How many file names a message lists before summarising the rest.
_MAX_LISTED = 5

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

  @classmethod
  def from_examples(cls, images: np.ndarray, masks: np.ndarray,
                    paths: Sequence[str],
                    defect_types: Sequence[str]) -> 'TestSet':
    """A TestSet whose labels follow from the defect types, wherever it was read."""
    return cls(images=images, masks=masks,
               labels=np.array([d != GOOD for d in defect_types],
                               dtype=np.int8),
               paths=tuple(paths), defect_types=tuple(defect_types))


@dataclasses.dataclass(frozen=True)
class TestFiles:
  """The files `read_test_set` reads, paths relative to the category folder.

  Listing and reading are separate so that the tfds cache fingerprints
  exactly the files it then reads.

  Attributes:
    paths: test images in sorted folder order, e.g. 'test/crack/000.png'.
    defect_types: the defect folder of each image ('good' for normal ones).
    mask_paths: the mask of each image, e.g. 'ground_truth/crack/000_mask.png';
      None for defect-free images.
  """
  __test__ = False  # Not a pytest test class despite its name.

  paths: tuple[str, ...]
  defect_types: tuple[str, ...]
  mask_paths: tuple[str | None, ...]


def _is_visible(name: str) -> bool:
  return not name.startswith('.')


def _image_names(folder: str) -> list[str]:
  """Sorted names of the image files in `folder` (hidden files ignored)."""
  return sorted(
      name for name in os.listdir(folder)
      if _is_visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)
      and os.path.isfile(os.path.join(folder, name)))


def _holds_images(folder: str) -> bool:
  """Whether `folder` or any visible folder below it holds an image file."""
  for root, dirs, names in os.walk(folder):
    dirs[:] = [name for name in dirs if _is_visible(name)]
    if any(_is_visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)
           for name in names):
      return True
  return False


def _flat_image_names(folder: str) -> list[str]:
  """`_image_names(folder)`, refusing images nested in a subfolder.

  The layout has no level below train/good/ and test/<defect>/, so images
  there would silently be left out of training or evaluation.

  Raises:
    DatasetError: naming the first subfolder that holds images.
  """
  for name in _subfolders(folder):
    subfolder = os.path.join(folder, name)
    if _holds_images(subfolder):
      raise DatasetError(
          f'images in subfolder {subfolder} would be left out: the MVTec AD '
          f'layout keeps them directly in {folder}; move them up or away')
  return _image_names(folder)


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


def _category_names(data_dir: str) -> list[str]:
  """Sorted names of the folders in `data_dir` that have train/good."""
  return [
      name for name in _subfolders(data_dir)
      if os.path.isdir(os.path.join(data_dir, name, 'train', GOOD))
  ]


def list_categories(data_dir: str) -> list[str]:
  """Sorted names of the folders in `data_dir` that have train/good.

  Raises:
    DatasetError: `data_dir` is missing or holds no category, saying the
      layout expected (and when `data_dir` is itself a category folder).
  """
  _check_data_dir(data_dir)
  names = _category_names(data_dir)
  if not names:
    hint = ''
    if os.path.isdir(os.path.join(data_dir, 'train', GOOD)):
      parent = os.path.dirname(os.path.abspath(data_dir))
      hint = (f'; {data_dir} itself looks like a category folder, so set '
              f'data_dir to its parent {parent}')
    raise DatasetError(
        f'no categories in {data_dir}: expected the MVTec AD layout, one '
        f'folder per category holding train/{GOOD}/ images '
        f'({os.path.join(data_dir, "<category>", "train", GOOD)}){hint}')
  return names


def category_dir(data_dir: str, category: str) -> str:
  """The category's folder, or an error listing the categories present."""
  _check_data_dir(data_dir)
  folder = os.path.join(data_dir, category)
  if not os.path.isdir(folder):
    existing = ', '.join(_category_names(data_dir)) or 'none'
    raise DatasetError(f'category {category!r} not found: no folder {folder} '
                       f'(categories in {data_dir}: {existing})')
  return folder


def train_files(data_dir: str, category: str) -> tuple[str, ...]:
  """Training image paths relative to the category folder, sorted by name."""
  folder = os.path.join(category_dir(data_dir, category), 'train', GOOD)
  if not os.path.isdir(folder):
    raise DatasetError(f'no training images: folder {folder} does not exist')
  names = _flat_image_names(folder)
  if not names:
    raise DatasetError(f'no training images in {folder} (looked for '
                       f'{", ".join(IMAGE_EXTENSIONS)} files)')
  return tuple(f'train/{GOOD}/{name}' for name in names)


def read_train_images(folder: str, paths: Sequence[str],
                      image_size: int) -> np.ndarray:
  """The images at `paths` (relative to `folder`), uint8 (N, S, S, 3)."""
  return np.stack(_parallel_map(
      lambda path: images.read_rgb(os.path.join(folder, path), image_size),
      paths))


def load_train_images(data_dir: str, category: str,
                      image_size: int) -> np.ndarray:
  """All defect-free training images, uint8 (N, image_size, image_size, 3)."""
  return read_train_images(category_dir(data_dir, category),
                           train_files(data_dir, category), image_size)


def _mask_path(folder: str, defect: str, image_name: str) -> str:
  """The mask of a defective image, relative to the category folder.

  Raises:
    DatasetError: no mask file, naming the expected .png.
  """
  stem = os.path.splitext(image_name)[0]
  base = f'ground_truth/{defect}/{stem}_mask'
  for extension in IMAGE_EXTENSIONS:
    if os.path.isfile(os.path.join(folder, base + extension)):
      return base + extension
  image_path = os.path.join(folder, 'test', defect, image_name)
  raise DatasetError(f'defective test image {image_path} has no mask: '
                     f'expected {os.path.join(folder, base)}.png')


def _check_mask_size(image_path: str, mask_path: str) -> None:
  """Checks from the headers that a mask was drawn for an image of its size."""
  image_hw = images.image_size_of(image_path)
  mask_hw = images.image_size_of(mask_path)
  if image_hw != mask_hw:
    raise DatasetError(
        f'mask {mask_path} has size (height, width) {mask_hw} but its image '
        f'{image_path} has size {image_hw}')


def _check_both_classes(test_dir: str, defect_types: Sequence[str]) -> None:
  """Image and pixel metrics need defect-free and defective test images."""
  if GOOD not in defect_types:
    raise DatasetError(
        f'test split {test_dir} has no defect-free images (no {GOOD}/ folder '
        f'with images): evaluation needs them next to the defective ones')
  if all(defect == GOOD for defect in defect_types):
    raise DatasetError(
        f'test split {test_dir} has only defect-free images ({GOOD}/): '
        'evaluation needs defective ones too, in test/<defect>/ with masks in '
        'ground_truth/<defect>/')


def test_files(data_dir: str, category: str) -> TestFiles:
  """The test images, their defect types and masks, in sorted folder order.

  Raises:
    DatasetError: no test folder or images, images outside a defect folder
      (which would be left out), a defective image without a mask, or a
      split lacking defect-free or defective images.
  """
  folder = category_dir(data_dir, category)
  test_dir = os.path.join(folder, 'test')
  if not os.path.isdir(test_dir):
    raise DatasetError(f'no test images: folder {test_dir} does not exist')
  loose = _image_names(test_dir)
  if loose:
    listed = ', '.join(loose[:_MAX_LISTED])
    if len(loose) > _MAX_LISTED:
      listed += f', ... ({len(loose) - _MAX_LISTED} more)'
    raise DatasetError(
        f'images directly in {test_dir} would be left out ({listed}): the '
        f'MVTec AD layout keeps them in test/{GOOD}/ or test/<defect>/')
  paths, defect_types, mask_paths = [], [], []
  for defect in _subfolders(test_dir):
    for name in _flat_image_names(os.path.join(test_dir, defect)):
      paths.append(f'test/{defect}/{name}')
      defect_types.append(defect)
      mask_paths.append(None if defect == GOOD else
                        _mask_path(folder, defect, name))
  if not paths:
    raise DatasetError(f'no test images in the subfolders of {test_dir}')
  _check_both_classes(test_dir, defect_types)
  return TestFiles(tuple(paths), tuple(defect_types), tuple(mask_paths))


def check_test_folder(data_dir: str, category: str) -> None:
  """Checks the test split without reading its images, only their headers.

  Catches what `load_test_set` would raise, before any training: the
  listing's problems (see `test_files`), unreadable image headers, masks
  whose size differs from their image, and blank masks. Masks are the only
  files decoded: they are small and mostly zero, so they decode fast.

  Raises:
    DatasetError: naming the first offending file or folder.
  """
  folder = category_dir(data_dir, category)
  files = test_files(data_dir, category)

  def check(index: int) -> None:
    image_path = os.path.join(folder, files.paths[index])
    mask_path = files.mask_paths[index]
    if mask_path is None:
      images.image_size_of(image_path)
    else:
      _check_mask_size(image_path, os.path.join(folder, mask_path))
      images.check_mask(os.path.join(folder, mask_path))

  _parallel_map(check, range(len(files.paths)))


def read_test_set(folder: str, files: TestFiles, image_size: int) -> TestSet:
  """Reads the listed test images and masks (paths relative to `folder`)."""

  def read(index: int) -> tuple[np.ndarray, np.ndarray]:
    image_path = os.path.join(folder, files.paths[index])
    image = images.read_rgb(image_path, image_size)
    mask_path = files.mask_paths[index]
    if mask_path is None:
      mask = np.zeros((image_size, image_size), dtype=bool)
    else:
      _check_mask_size(image_path, os.path.join(folder, mask_path))
      mask = images.read_mask(os.path.join(folder, mask_path), image_size)
    return image, mask

  pairs = _parallel_map(read, range(len(files.paths)))
  return TestSet.from_examples(
      images=np.stack([image for image, _ in pairs]),
      masks=np.stack([mask for _, mask in pairs]),
      paths=files.paths, defect_types=files.defect_types)


def load_test_set(data_dir: str, category: str, image_size: int) -> TestSet:
  """The test split: images, pixel masks and labels, in sorted folder order."""
  return read_test_set(category_dir(data_dir, category),
                       test_files(data_dir, category), image_size)
