"""Reading a flat folder of new images to predict on.

The folder is whatever a user points at, not a curated dataset, so stray
files (notes, spreadsheets) are reported and skipped instead of stopping the
run; only a folder with no image at all is an error.
"""

import dataclasses
import os

from absl import logging
import numpy as np

from twostage_jax.data import images
from twostage_jax.data import mvtec
from twostage_jax.data.errors import DatasetError

# How many file names a message lists before summarising the rest.
_MAX_LISTED = 10


@dataclasses.dataclass(frozen=True)
class FolderImages:
  """The images of one folder, sorted by file name.

  Attributes:
    images: uint8 (N, S, S, 3), resized to the model's input size.
    paths: path of each image file.
    original_sizes: int (N, 2), (height, width) of each file, so that
      outputs can be written back at the size the user gave.
  """
  images: np.ndarray
  paths: list[str]
  original_sizes: np.ndarray


def _listing(names: list[str]) -> str:
  """Comma-separated names, cut short so a huge folder keeps messages readable."""
  listed = ', '.join(names[:_MAX_LISTED])
  if len(names) > _MAX_LISTED:
    listed += f', ... ({len(names) - _MAX_LISTED} more)'
  return listed


def _plural(count: int, noun: str) -> str:
  return f'{count} {noun}' if count == 1 else f'{count} {noun}s'


def _no_images_error(folder: str, others: list[str],
                     subfolders: list[str]) -> DatasetError:
  """Says what the folder holds instead, the likeliest clue to a wrong path."""
  found = []
  if others:
    found.append(f'{_plural(len(others), "other file")}: {_listing(others)}')
  if subfolders:
    found.append(f'{_plural(len(subfolders), "subfolder")} (not searched): '
                 f'{_listing(subfolders)}')
  contents = '; '.join(found) if found else 'nothing else'
  return DatasetError(
      f'no images ({", ".join(mvtec.IMAGE_EXTENSIONS)}) in {folder}; '
      f'found {contents}')


def load_image_folder(folder: str, image_size: int) -> FolderImages:
  """Reads every image file directly in `folder`, resized to image_size.

  Hidden files are ignored, subfolders are not searched, and other files
  are skipped with one warning. Any image mode (grayscale, RGBA, 16-bit)
  and any mix of sizes is accepted.

  Raises:
    DatasetError: `folder` is not a folder, holds no image, or an image
      file cannot be decoded (the message names the file).
  """
  if not os.path.isdir(folder):
    raise DatasetError(f'image folder {folder} does not exist or is not a '
                       'folder')
  image_names, others, subfolders = [], [], []
  names = sorted(os.listdir(folder))
  for name in filter(mvtec._is_visible, names):  # pylint: disable=protected-access
    if os.path.isdir(os.path.join(folder, name)):
      subfolders.append(name)
    elif name.lower().endswith(mvtec.IMAGE_EXTENSIONS):
      image_names.append(name)
    else:
      others.append(name)
  if not image_names:
    raise _no_images_error(folder, others, subfolders)
  if others:
    what = 'is not an image' if len(others) == 1 else 'are not images'
    logging.warning('skipping %s that %s: %s', _plural(len(others), 'file'),
                    what, _listing(others))

  paths = [os.path.join(folder, name) for name in image_names]

  def read(path: str) -> tuple[np.ndarray, tuple[int, int]]:
    return images.read_rgb(path, image_size), images.image_size_of(path)

  decoded = mvtec._parallel_map(read, paths)  # pylint: disable=protected-access
  return FolderImages(
      images=np.stack([image for image, _ in decoded]),
      paths=paths,
      original_sizes=np.array([size for _, size in decoded], dtype=np.int64))
