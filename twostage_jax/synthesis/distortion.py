"""Bauer's training input: a random patch elastically deformed under a shape."""

import math

import ml_collections
import numpy as np
from scipy import ndimage


def _check_range(config: ml_collections.ConfigDict, name: str, low: float,
                 high: float, low_open: bool = False,
                 high_open: bool = False) -> None:
  """Raises ValueError naming `name` unless the field lies in the interval."""
  value = config[name]
  above = value > low if low_open else value >= low
  below = value < high if high_open else value <= high
  if not (above and below):  # also rejects NaN
    interval = (('(' if low_open else '[') + f'{low}, {high}'
                + (')' if high_open else ']'))
    raise ValueError(f'{name} must lie in {interval}; got {value}.')


class PatchDistorter:
  """Replaces a random patch of a normal image by a deformed copy of itself.

  Bauer (2022) trains an autoencoder to map such a partly modified image
  back to the normal one; the mask of modified pixels weights his objective.
  The same contract as PseudoAnomalySynthesizer (image in [0, 1], mask of
  exactly the changed pixels) lets it serve as a further pseudo-anomaly
  generator for the two-stage model.

  Per sample, with probability p_distort (else the image is returned as is
  with an empty mask):
  1. a patch of round(f_h H) x round(f_w W) pixels (at least 1), with f_h,
     f_w drawn independently from U(patch_min_fraction,
     patch_max_fraction), at a uniform position inside the image;
  2. the patch is deformed elastically (Simard et al. 2003): two fields of
     U(-1, 1) noise, Gaussian-smoothed, give the displacement, and the
     patch is resampled bilinearly at the displaced coordinates, reflecting
     at the patch border, so only the patch's own content moves;
  3. its brightness is multiplied by 1 + U(-brightness_max, brightness_max)
     and clipped to [0, 1];
  4. the result replaces the patch only under a blob-shaped mask: uniform
     noise over the patch, Gaussian-smoothed, rescaled to [0, 1] and
     thresholded. The rescaling maps the largest value to exactly 1, so for
     a threshold below 1 the shape is never empty and needs no resampling.

  The returned mask is the shape AND (any channel changed), so an all-zero
  mask always comes with an unchanged image.

  Config fields:
    p_distort: probability in [0, 1] that a sample is distorted at all.
    patch_min_fraction, patch_max_fraction: bounds in (0, 1] of the patch
      side as a fraction of the image side (min <= max).
    elastic_alpha: largest displacement in pixels (>= 0; 0 = no
      deformation). Simard scales the smoothed field by alpha directly, so
      the displacement his alpha yields shrinks as sigma grows; here the
      field is first divided by its largest vector length, which makes
      alpha a length in pixels independent of sigma.
    elastic_sigma: standard deviation in pixels (>= 0) of the Gaussian
      smoothing the displacement fields: the scale of the local warps, the
      same in small and large patches.
    shape_sigma: standard deviation of the Gaussian smoothing the shape
      noise, as a fraction (>= 0) of the patch's shorter side, so a patch
      holds about as many blobs whatever its size (0.05: many small blobs,
      0.1: a few, 0.2 and more: one or two large regions).
    shape_threshold: in [0, 1); the shape is where the rescaled smoothed
      noise exceeds it. Higher values give smaller, fewer blobs.
    brightness_max: in [0, 1]; 0 leaves the brightness unchanged.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    """Validates and keeps the config section (fields in the class doc)."""
    _check_range(config, 'p_distort', 0.0, 1.0)
    _check_range(config, 'patch_min_fraction', 0.0, 1.0, low_open=True)
    _check_range(config, 'patch_max_fraction', 0.0, 1.0, low_open=True)
    if config.patch_min_fraction > config.patch_max_fraction:
      raise ValueError(
          'patch_min_fraction must not exceed patch_max_fraction; got '
          f'{config.patch_min_fraction} > {config.patch_max_fraction}.')
    _check_range(config, 'elastic_alpha', 0.0, math.inf, high_open=True)
    _check_range(config, 'elastic_sigma', 0.0, math.inf, high_open=True)
    _check_range(config, 'shape_sigma', 0.0, math.inf, high_open=True)
    _check_range(config, 'shape_threshold', 0.0, 1.0, high_open=True)
    _check_range(config, 'brightness_max', 0.0, 1.0)
    self._config = config

  def _patch_box(self, height: int, width: int, rng: np.random.Generator
                 ) -> tuple[int, int, int, int]:
    """(top, left, patch height, patch width) of a patch inside the image."""
    config = self._config
    f_h, f_w = rng.uniform(config.patch_min_fraction,
                           config.patch_max_fraction, size=2)
    size_h = min(max(round(f_h * height), 1), height)
    size_w = min(max(round(f_w * width), 1), width)
    top = int(rng.integers(0, height - size_h + 1))
    left = int(rng.integers(0, width - size_w + 1))
    return top, left, size_h, size_w

  def _deform(self, patch: np.ndarray, rng: np.random.Generator
              ) -> np.ndarray:
    """The patch resampled along a smooth random displacement field."""
    config = self._config
    if config.elastic_alpha == 0:
      return patch.copy()
    size_h, size_w = patch.shape[:2]
    field = rng.uniform(-1.0, 1.0, size=(2, size_h, size_w))
    field = ndimage.gaussian_filter(
        field, sigma=(0.0, config.elastic_sigma, config.elastic_sigma),
        mode='reflect')
    peak = np.sqrt(np.square(field).sum(axis=0)).max()
    if peak > 0:
      field *= config.elastic_alpha / peak
    coords = np.mgrid[0:size_h, 0:size_w].astype(np.float64) + field
    return np.stack(
        [ndimage.map_coordinates(patch[..., c], coords, order=1,
                                 mode='reflect')
         for c in range(patch.shape[2])], axis=-1)

  def _shape(self, size_h: int, size_w: int, rng: np.random.Generator
             ) -> np.ndarray:
    """Non-empty bool (size_h, size_w) blob mask."""
    config = self._config
    noise = rng.uniform(0.0, 1.0, size=(size_h, size_w))
    noise = ndimage.gaussian_filter(
        noise, sigma=config.shape_sigma * min(size_h, size_w), mode='reflect')
    low, high = noise.min(), noise.max()
    if high <= low:  # a single pixel (or a constant field): take it all
      return np.ones((size_h, size_w), bool)
    return (noise - low) / (high - low) > config.shape_threshold

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Draws one training input.

    Args:
      image: float32 (H, W, 3) normal image in [0, 1] (clipped to it).
      rng: random generator; the same state gives the same sample.

    Returns:
      (float32 (H, W, 3) image in [0, 1], float32 (H, W) mask of exactly the
      changed pixels, 1 = modified). Pixels outside the patch keep the
      (clipped) input's values bit for bit.
    """
    if image.ndim != 3 or image.shape[2] != 3:
      raise ValueError(f'Expected an (H, W, 3) image; got {image.shape}.')
    out = np.clip(image, 0.0, 1.0, dtype=np.float32)
    mask = np.zeros(out.shape[:2], np.float32)
    config = self._config
    if rng.random() >= config.p_distort:
      return out, mask
    top, left, size_h, size_w = self._patch_box(*out.shape[:2], rng)
    window = (slice(top, top + size_h), slice(left, left + size_w))
    patch = out[window]
    distorted = self._deform(patch, rng)
    factor = 1.0 + rng.uniform(-config.brightness_max, config.brightness_max)
    if factor != 1.0:
      distorted *= np.float32(factor)
    np.clip(distorted, 0.0, 1.0, out=distorted)
    shape = self._shape(size_h, size_w, rng)
    changed = shape & np.any(distorted != patch, axis=-1)
    patch[changed] = distorted[changed]  # patch is a view into out
    mask[window] = changed
    return out, mask
