"""Decoding one image or mask file into a fixed-size numpy array.

Sizes are checked on the ORIGINAL files (`image_size_of`), before resizing:
after resizing every array has the same shape, so a mask drawn for another
image would go unnoticed.
"""

import numpy as np
from PIL import Image

from twostage_jax.data.errors import DatasetError

# PIL modes holding one integer channel wider than 8 bits (16-bit PNG/TIFF).
_WIDE_INT_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')
_WIDE_INT_MAX = 65535.0


def _decode(path: str) -> Image.Image:
  """Opens and fully decodes `path`, turning any decoder failure into one error.

  PIL signals corrupt or truncated data with many unrelated exception types
  (OSError, SyntaxError, ValueError, zlib.error, struct.error, ...), so all
  of them are caught here and reported with the file's name.
  """
  try:
    with Image.open(path) as image:
      image.load()
      return image
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise DatasetError(f'cannot read image file {path}: {e}') from e


def image_size_of(path: str) -> tuple[int, int]:
  """(height, width) of the stored image, read from its header only."""
  try:
    with Image.open(path) as image:
      width, height = image.size
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise DatasetError(f'cannot read image file {path}: {e}') from e
  return height, width


def _wide_int_to_unit(image: Image.Image) -> np.ndarray:
  """Float32 in [0, 1] from a 16-bit single-channel image."""
  values = np.asarray(image, dtype=np.float32) / _WIDE_INT_MAX
  return np.clip(values, 0.0, 1.0)


def read_rgb(path: str, size: int) -> np.ndarray:
  """Reads any common image file as uint8 RGB of shape (size, size, 3).

  Grayscale, palette, alpha and 16-bit files all become 8-bit RGB (alpha is
  dropped), so every category looks the same to the model. Resizing uses
  PIL bilinear and is skipped when the file already has that size.
  """
  image = _decode(path)
  if image.mode in _WIDE_INT_MODES:
    gray = np.rint(_wide_int_to_unit(image) * 255.0).astype(np.uint8)
    image = Image.fromarray(gray)
  image = image.convert('RGB')
  if image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(image, dtype=np.uint8)


def read_mask(path: str, size: int) -> np.ndarray:
  """Reads a ground-truth mask as bool (size, size): resized, then > 0.5.

  Resizing happens on [0, 1] floats so that a mask keeps its area under
  downscaling, which is the MVTec AD evaluation convention.
  """
  image = _decode(path)
  if image.mode in _WIDE_INT_MODES:
    values = _wide_int_to_unit(image)
  else:
    values = np.asarray(image.convert('L'), dtype=np.float32) / 255.0
  if values.shape != (size, size):
    resized = Image.fromarray(values).resize(
        (size, size), Image.Resampling.BILINEAR)
    values = np.asarray(resized)
  return values > 0.5
