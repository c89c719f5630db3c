"""Random right-angle rotations and flips of training images."""

from collections.abc import Sequence

import numpy as np


def random_geometric(image: np.ndarray, rng: np.random.Generator,
                     rotations: Sequence[int], hflip: bool,
                     vflip: bool) -> np.ndarray:
  """Rotates by a random angle of `rotations`, then randomly flips.

  Which transforms keep an image normal depends on the category, so the
  configs choose them: textures (carpet, grid, ...) look alike under all
  rotations and flips, objects such as a bottle photographed upright may
  allow none, and (0,) with no flips disables the augmentation.

  The random draws depend only on `rotations`, `hflip` and `vflip`, never on
  the array, so an image and its mask augmented from two generators in the
  same state stay aligned.

  Args:
    image: (H, W) or (H, W, C) array; it is not modified.
    rng: random generator.
    rotations: angles in degrees, multiples of 90 (negative and >= 360 are
      reduced modulo 360), one drawn uniformly. Positive angles turn the
      image counter-clockwise as displayed with row 0 at the top, i.e.
      np.rot90(image, angle // 90). Odd multiples of 90 need a square image
      (checked even when such an angle is not drawn).
    hflip: if true, mirror left-right (columns reversed) with probability
      0.5, after the rotation.
    vflip: if true, mirror top-bottom (rows reversed) with probability 0.5,
      after the horizontal flip.

  Returns:
    A new C-contiguous array of the input's shape and dtype.
  """
  if image.ndim not in (2, 3):
    raise ValueError(f'Expected an (H, W) or (H, W, C) array; got '
                     f'{image.shape}.')
  if not rotations:
    raise ValueError('rotations must hold at least one angle, e.g. (0,).')
  for angle in rotations:
    if angle % 90:
      raise ValueError(f'rotations must be multiples of 90; got {angle}.')
    if angle % 180 and image.shape[0] != image.shape[1]:
      raise ValueError(f'Rotating by {angle} degrees needs a square image; '
                       f'got {image.shape}.')
  angle = rotations[int(rng.integers(len(rotations)))]
  out = np.rot90(image, k=(angle // 90) % 4)
  if hflip and rng.random() < 0.5:
    out = out[:, ::-1]
  if vflip and rng.random() < 0.5:
    out = out[::-1]
  return np.array(out, order='C')
