"""Decoding one image or mask file into a fixed-size numpy array.

Sizes are checked on the ORIGINAL files (`image_size_of`), before resizing:
after resizing every array has the same shape, so a mask drawn for another
image would go unnoticed.
"""

import numpy as np
from PIL import Image

from twostage_jax.data.errors import DatasetError

# PIL modes holding one integer channel wider than 8 bits (16-bit PNG/TIFF,
# 32-bit TIFF).
_WIDE_INT_MODES = ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N')
# PIL's mode for one 32-bit float channel (float TIFFs).
_FLOAT_MODE = 'F'
# Modes whose pixels are one number each, read as they are for masks.
_SINGLE_CHANNEL_MODES = ('1', 'L', _FLOAT_MODE, *_WIDE_INT_MODES)
_TIFF_EXTENSIONS = ('.tif', '.tiff')


def _read_error(path: str, error: Exception) -> DatasetError:
  """The error for a file PIL cannot read, with a hint for float TIFFs.

  PIL holds single-channel float TIFFs but not multi-channel ones, which it
  reports as an unidentified image, as if the file were not a TIFF at all.
  """
  hint = ''
  if (isinstance(error, Image.UnidentifiedImageError)
      and path.lower().endswith(_TIFF_EXTENSIONS)):
    hint = ('; PIL reads 8- and 16-bit TIFFs and single-channel float ones, '
            'so save multi-channel float TIFFs as 8- or 16-bit')
  return DatasetError(f'cannot read image file {path}: {error}{hint}')


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
    raise _read_error(path, e) from e


def image_size_of(path: str) -> tuple[int, int]:
  """(height, width) of the stored image, read from its header only."""
  try:
    with Image.open(path) as image:
      width, height = image.size
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _read_error(path, e) from e
  return height, width


def integers_to_unit(values: np.ndarray) -> np.ndarray:
  """Float32 in [0, 1] of integer pixel values, by their dtype's range.

  0 is black and the dtype's largest value white: uint8 /255, uint16 /65535,
  int32 /(2**31 - 1). So a 12-bit camera's image kept in uint16 (0..4095)
  reads dark; divide it by 4095 first to use its full range.

  Raises:
    ValueError: naming the smallest value, if any is negative.
  """
  lowest = values.min(initial=0)
  if lowest < 0:
    raise ValueError(f'{values.dtype} pixel values must be 0 or more, found {lowest}')
  return (values.astype(np.float64) / np.iinfo(values.dtype).max).astype(np.float32)


def _float_to_unit(image: Image.Image) -> np.ndarray:
  """Float32 in [0, 1] from a float image, whichever range it was saved in.

  Float files hold either [0, 1] intensities or 8-bit values: an image whose
  largest value is at most 1 is read as the former, any other as 0..255
  (clipped). Only an 8-bit image darker than 1/255 everywhere, black to the
  eye, would be misread. NaN reads as 0.
  """
  values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
  if values.max(initial=0.0) > 1.0:
    values = values / 255.0
  return np.clip(values, 0.0, 1.0)


def read_rgb(path: str, size: int) -> np.ndarray:
  """Reads any common image file as uint8 RGB of shape (size, size, 3).

  Grayscale, palette, alpha, 16- and 32-bit integer and float files all
  become 8-bit RGB (alpha is dropped), so every category looks the same to
  the model. Integer files are read by their dtype's range
  (`integers_to_unit`); see `_float_to_unit` for the range of float files. Resizing uses PIL bilinear
  and is skipped when the file already has that size.
  """
  image = _decode(path)
  if image.mode in _WIDE_INT_MODES:
    try:
      unit = integers_to_unit(np.asarray(image))
    except ValueError as error:
      raise DatasetError(f'cannot read image file {path}: {error}') from error
    image = Image.fromarray(np.rint(unit * 255.0).astype(np.uint8))
  elif image.mode == _FLOAT_MODE:
    image = Image.fromarray(np.rint(_float_to_unit(image) * 255.0).astype(np.uint8))
  image = image.convert('RGB')
  if image.size != (size, size):
    image = image.resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(image, dtype=np.uint8)


def _anomalous_pixels(path: str) -> np.ndarray:
  """Bool (H, W) at the stored size: True where any channel is non-zero.

  Masks come as 0/255, 0/1, 16-bit or float files; the only value they
  share for the background is 0. Alpha is ignored.

  Raises:
    DatasetError: the file is unreadable or marks no pixel: a mask exists
      only for a defective image, so a blank one is the wrong file.
  """
  image = _decode(path)
  if image.mode in _SINGLE_CHANNEL_MODES:
    anomalous = np.asarray(image) != 0
  else:
    anomalous = np.asarray(image.convert('RGB')).any(axis=-1)
  if not anomalous.any():
    raise DatasetError(f'mask {path} is empty (every pixel is 0), but a mask '
                       'marks the defect of a defective test image')
  return anomalous


def check_mask(path: str) -> None:
  """Decodes a mask only to check that it marks at least one pixel.

  Raises:
    DatasetError: the file is unreadable or all zero.
  """
  _anomalous_pixels(path)


def read_mask(path: str, size: int) -> np.ndarray:
  """Reads a ground-truth mask as bool (size, size).

  Any non-zero value is anomalous, so 0/1 and 0/255 masks read the same. The
  binary mask is resized as [0, 1] floats, then thresholded at 0.5, so that
  it keeps its area under downscaling (the MVTec AD evaluation convention).

  Raises:
    DatasetError: the file is unreadable or all zero.
  """
  anomalous = _anomalous_pixels(path)
  if anomalous.shape == (size, size):
    return anomalous
  resized = Image.fromarray(anomalous.astype(np.float32)).resize(
      (size, size), Image.Resampling.BILINEAR)
  return np.asarray(resized) > 0.5
