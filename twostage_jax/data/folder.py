"""Reading a flat folder of new images to predict on.

The folder is whatever a user points at, not a curated dataset, so stray
files (notes, spreadsheets), subfolders and image files that cannot be
decoded are reported and skipped instead of stopping the run; only a folder
with no readable image at all is an error.
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
    unreadable: path -> error message (naming the file and the reason) of
      each image file that could not be decoded, sorted by file name; kept
      so the outputs can still list them.
  """
  images: np.ndarray
  paths: list[str]
  original_sizes: np.ndarray
  unreadable: dict[str, str] = dataclasses.field(default_factory=dict)


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


def _read(path: str, image_size: int
          ) -> tuple[np.ndarray, tuple[int, int]] | str:
  """The image and its original size, or the message naming why not."""
  try:
    return images.read_rgb(path, image_size), images.image_size_of(path)
  except DatasetError as error:
    return str(error)


def load_image_folder(folder: str, image_size: int) -> FolderImages:
  """Reads every image file directly in `folder`, resized to image_size.

  Hidden files are ignored, subfolders are not searched, and other files
  are skipped with one warning, subfolders with another. An image file that
  cannot be decoded is skipped with a warning naming it and the reason, and
  listed in `FolderImages.unreadable`, so one bad file does not cost the
  rest. Any image mode (grayscale, RGBA, 16-bit) and any mix of sizes is
  accepted.

  Raises:
    DatasetError: `folder` is not a folder, or holds no readable image.
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
  if subfolders:
    logging.warning('skipping %s of %s (subfolders are not searched): %s',
                    _plural(len(subfolders), 'subfolder'), folder,
                    _listing(subfolders))

  all_paths = [os.path.join(folder, name) for name in image_names]
  decoded = mvtec._parallel_map(  # pylint: disable=protected-access
      lambda path: _read(path, image_size), all_paths)
  unreadable = {path: result for path, result in zip(all_paths, decoded)
                if isinstance(result, str)}
  for reason in unreadable.values():
    logging.warning('skipping an unreadable image: %s', reason)
  readable = [(path, result) for path, result in zip(all_paths, decoded)
              if not isinstance(result, str)]
  if not readable:
    unreadable_names = [os.path.basename(path) for path in unreadable]
    raise DatasetError(
        f'no readable image in {folder}; '
        f'{_plural(len(unreadable_names), "image file")} could not be '
        f'decoded: {_listing(unreadable_names)}')
  return FolderImages(
      images=np.stack([image for _, (image, _) in readable]),
      paths=[path for path, _ in readable],
      original_sizes=np.array([size for _, (_, size) in readable],
                              dtype=np.int64),
      unreadable=unreadable)
