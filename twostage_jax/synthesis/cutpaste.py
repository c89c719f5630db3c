"""AnoSeg's synthetic anomalies: hard augmentation, then CutPaste."""

import math
import numbers

import ml_collections
import numpy as np
from skimage import color

from twostage_jax.synthesis.distortion import _check_range

# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114])


def rotate(image: np.ndarray, quarter_turns: int) -> np.ndarray:
  """The image turned counter-clockwise by `quarter_turns` x 90 degrees.

  Odd turns swap height and width, so they need a square image: the
  rotated patch source must keep the input's shape.

  Args:
    image: (H, W) or (H, W, C) array; it is not modified.
    quarter_turns: number of turns, as np.rot90's k (any integer).

  Returns:
    A new C-contiguous array of the input's shape and dtype.
  """
  if quarter_turns % 2 and image.shape[0] != image.shape[1]:
    raise ValueError(f'Rotating by {quarter_turns} quarter turns needs a '
                     f'square image; got {image.shape}.')
  return np.array(np.rot90(image, k=quarter_turns, axes=(0, 1)), order='C')


def _check_divisible(shape: tuple[int, ...], grid: int) -> None:
  """Raises ValueError unless grid >= 2 divides height and width."""
  if grid < 2:
    raise ValueError(f'grid must be at least 2; got {grid}.')
  if shape[0] % grid or shape[1] % grid:
    raise ValueError(f'Image height and width must be divisible by the grid '
                     f'{grid}; got {shape[0]} x {shape[1]}.')


def permute_pieces(image: np.ndarray, grid: int, rng: np.random.Generator
                   ) -> np.ndarray:
  """The image's grid x grid equal pieces reassembled out of order.

  CSI's "perm" shifting transformation (Tack et al. 2020, 2 x 2 pieces).
  The permutation is uniform over all but the identity, which would not
  shift the image at all; identical pieces may still leave it unchanged.

  Args:
    image: (H, W) or (H, W, C) array with H and W divisible by `grid`; it is
      not modified.
    grid: pieces per side, at least 2.
    rng: random generator.

  Returns:
    A new C-contiguous array of the input's shape and dtype.
  """
  _check_divisible(image.shape, grid)
  height, width = image.shape[:2]
  rest = image.shape[2:]
  piece_h, piece_w = height // grid, width // grid
  pieces = image.reshape(grid, piece_h, grid, piece_w, *rest).swapaxes(1, 2)
  pieces = pieces.reshape(grid * grid, piece_h, piece_w, *rest)
  identity = np.arange(grid * grid)
  order = rng.permutation(identity)
  while np.array_equal(order, identity):  # redraw: uniform over the rest
    order = rng.permutation(identity)
  pieces = pieces[order].reshape(grid, grid, piece_h, piece_w, *rest)
  return np.array(pieces.swapaxes(1, 2).reshape(image.shape), order='C')


def color_jitter(image: np.ndarray, brightness: float, contrast: float,
                 saturation: float, hue: float, rng: np.random.Generator
                 ) -> np.ndarray:
  """torchvision's ColorJitter on a float RGB image in [0, 1].

  Brightness, contrast, saturation and hue are changed in this fixed order
  (torchvision draws a random order per call), each result clipped to
  [0, 1]:
  - brightness: multiplied by U(max(0, 1 - brightness), 1 + brightness);
  - contrast: blended by U(max(0, 1 - contrast), 1 + contrast) with the
    mean of the greyscale image (ITU-R 601-2 luma);
  - saturation: blended by U(max(0, 1 - saturation), 1 + saturation) with
    the greyscale image;
  - hue: shifted by U(-hue, hue) of the colour circle, in HSV.
  A strength of 0 skips its step (and its random draw), so it leaves the
  image exactly as it is. The arithmetic is in float64, so a greyscale
  image comes back unchanged by saturation and hue jitter.

  Args:
    image: (H, W, 3) RGB array in [0, 1]; it is not modified.
    brightness, contrast, saturation: strengths, >= 0.
    hue: strength in [0, 0.5].
    rng: random generator.

  Returns:
    A new float32 (H, W, 3) array in [0, 1].
  """
  if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
    raise ValueError(
        'brightness, contrast and saturation must be >= 0 and hue in '
        f'[0, 0.5]; got {brightness}, {contrast}, {saturation}, {hue}.')
  out = image.astype(np.float64)

  def factor(strength: float) -> float:
    return rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength)

  def blend(other: np.ndarray | float, weight: float) -> np.ndarray:
    return np.clip(weight * out + (1.0 - weight) * other, 0.0, 1.0)

  if brightness > 0:
    out = np.clip(out * factor(brightness), 0.0, 1.0)
  if contrast > 0:
    out = blend((out @ _LUMA).mean(), factor(contrast))
  if saturation > 0:
    out = blend((out @ _LUMA)[..., None], factor(saturation))
  if hue > 0:
    hsv = color.rgb2hsv(out)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue)) % 1.0
    out = np.clip(color.hsv2rgb(hsv), 0.0, 1.0)
  return out.astype(np.float32)


class HardCutPaste:
  """Pastes a patch of a hard-augmented copy of a normal image into it.

  AnoSeg (Sec. 3.1, Fig. 3) makes its synthetic anomalies this way: the
  hard augmentations push the copy away from the normal distribution, and
  CutPaste (Li et al. 2021) puts a piece of it into a random region of the
  normal image. The mask follows this package's convention, 1 = anomaly;
  the paper's masks mark the normal pixels with 1, and the AnoSeg method
  plug-in inverts it.

  Per sample, with probability p_anomaly (else the image is returned as is
  with an empty mask):
  1. a copy of the image is rotated by 1, 2 or 3 quarter turns (uniform)
     with probability p_rotation, then its pieces permuted (permute_pieces)
     with probability p_perm, then colour-jittered (color_jitter) with
     probability p_color_jitter: the order of Fig. 3;
  2. a patch of area U(area_min, area_max) H W and aspect ratio h / w
     log-uniform in [aspect_min, 1 / aspect_min] (sides rounded, clipped to
     the image) is cut at a uniform position of the copy and pasted at an
     independent uniform position of the image.

  The returned mask is exactly the pixels changed in any channel, so an
  all-zero mask always comes with an unchanged image.

  The paper gives no numbers beyond p = 0.5 for each augmentation; the
  defaults of the config come from the works it builds on:
  - rotation by multiples of 90 degrees and 2 x 2 perm: CSI's shifting
    transformations (Tack et al. 2020), which AnoSeg cites for its hard
    augmentation;
  - jitter strengths 0.4 / 0.4 / 0.4 / 0.1: SimCLR's and CSI's ColorJitter;
  - patch area in [0.02, 0.15] of the image and aspect ratio log-uniform in
    [0.3, 1 / 0.3]: CutPaste (Li et al. 2021) and its public code.

  Config fields:
    p_anomaly: probability in [0, 1] that a sample gets an anomaly at all.
    p_rotation, p_perm, p_color_jitter: probabilities in [0, 1] of each
      hard augmentation.
    perm_grid: pieces per side of the perm, an integer >= 2 dividing the
      image height and width.
    jitter_brightness, jitter_contrast, jitter_saturation: colour jitter
      strengths, >= 0 (0 = unchanged).
    jitter_hue: hue jitter strength in [0, 0.5], a fraction of the circle.
    area_min, area_max: bounds of the patch area as a fraction of the image
      area, 0 < area_min <= area_max <= 1.
    aspect_min: in (0, 1]; the patch aspect ratio lies in [aspect_min,
      1 / aspect_min].
  """

  def __init__(self, config: ml_collections.ConfigDict):
    """Validates and keeps the config section (fields in the class doc)."""
    for name in ('p_anomaly', 'p_rotation', 'p_perm', 'p_color_jitter'):
      _check_range(config, name, 0.0, 1.0)
    grid = config.perm_grid
    if (isinstance(grid, bool) or not isinstance(grid, numbers.Integral)
        or grid < 2):
      raise ValueError(f'perm_grid must be an integer >= 2; got {grid}.')
    for name in ('jitter_brightness', 'jitter_contrast', 'jitter_saturation'):
      _check_range(config, name, 0.0, math.inf, high_open=True)
    _check_range(config, 'jitter_hue', 0.0, 0.5)
    _check_range(config, 'area_min', 0.0, 1.0, low_open=True)
    _check_range(config, 'area_max', 0.0, 1.0, low_open=True)
    if config.area_min > config.area_max:
      raise ValueError('area_min must not exceed area_max; got '
                       f'{config.area_min} > {config.area_max}.')
    _check_range(config, 'aspect_min', 0.0, 1.0, low_open=True)
    self._config = config

  def _hard_augment(self, image: np.ndarray, rng: np.random.Generator
                    ) -> np.ndarray:
    """The image after each hard augmentation drawn for it."""
    config = self._config
    if rng.random() < config.p_rotation:
      image = rotate(image, int(rng.integers(1, 4)))
    if rng.random() < config.p_perm:
      image = permute_pieces(image, config.perm_grid, rng)
    if rng.random() < config.p_color_jitter:
      image = color_jitter(image, config.jitter_brightness, config.jitter_contrast,
                           config.jitter_saturation, config.jitter_hue, rng)
    return image

  def _patch_size(self, height: int, width: int, rng: np.random.Generator
                  ) -> tuple[int, int]:
    """(patch height, patch width), each at least 1 and within the image."""
    config = self._config
    area = rng.uniform(config.area_min, config.area_max) * height * width
    log_aspect = abs(math.log(config.aspect_min))  # abs: +0.0 for aspect_min 1
    aspect = math.exp(rng.uniform(-log_aspect, log_aspect))
    size_h = min(max(round(math.sqrt(area * aspect)), 1), height)
    size_w = min(max(round(math.sqrt(area / aspect)), 1), width)
    return size_h, size_w

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Draws one synthetic anomaly.

    Args:
      image: float32 (H, W, 3) normal image in [0, 1] (clipped to it),
        square (for the rotation), with H divisible by perm_grid when
        p_perm > 0.
      rng: random generator; the same state gives the same sample.

    Returns:
      (float32 (H, W, 3) image in [0, 1], float32 (H, W) mask of exactly the
      changed pixels, 1 = anomaly). Pixels outside the mask keep the
      (clipped) input's values bit for bit.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
      raise ValueError(f'Expected a square (H, H, 3) image; got {image.shape}.')
    config = self._config
    if config.p_perm > 0:  # checked even when the perm is not drawn
      _check_divisible(image.shape, config.perm_grid)
    out = np.clip(image, 0.0, 1.0, dtype=np.float32)
    mask = np.zeros(out.shape[:2], np.float32)
    if rng.random() >= config.p_anomaly:
      return out, mask
    # A copy: with no augmentation drawn, the patch must not alias `out`.
    augmented = self._hard_augment(out.copy(), rng)
    height, width = out.shape[:2]
    size_h, size_w = self._patch_size(height, width, rng)
    src_top = int(rng.integers(0, height - size_h + 1))
    src_left = int(rng.integers(0, width - size_w + 1))
    top = int(rng.integers(0, height - size_h + 1))
    left = int(rng.integers(0, width - size_w + 1))
    patch = augmented[src_top:src_top + size_h, src_left:src_left + size_w]
    window = (slice(top, top + size_h), slice(left, left + size_w))
    target = out[window]  # a view into out
    changed = np.any(patch != target, axis=-1)
    target[changed] = patch[changed]
    mask[window] = changed
    return out, mask
