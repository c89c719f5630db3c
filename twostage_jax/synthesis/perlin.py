"""Perlin gradient noise and the thresholded Perlin masks of DRAEM."""

import ml_collections
import numpy as np
from PIL import Image


def _fade(t: np.ndarray) -> np.ndarray:
  """Perlin's quintic fade 6t^5 - 15t^4 + 10t^3 (C2-continuous at cells)."""
  return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_noise(
    shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
  """Single-octave 2-D Perlin noise with a res[0] x res[1] gradient lattice.

  The lattice cell is ceil(shape / res) pixels, so the noise is that of the
  next multiple of res, cropped to shape. Values lie in [-1, 1] (the raw 2-D
  noise is bounded by sqrt(1/2) and is scaled by sqrt(2)) and are exactly 0
  at lattice points.

  Args:
    shape: (height, width) of the output.
    res: number of lattice cells along (height, width).
    rng: source of the random gradient directions.

  Returns:
    float32 array of the given shape.
  """
  height, width = shape
  res_y, res_x = res
  cell_y = -(-height // res_y)
  cell_x = -(-width // res_x)
  angles = rng.uniform(0.0, 2.0 * np.pi, size=(res_y + 1, res_x + 1))
  grad_y = np.cos(angles).astype(np.float32)
  grad_x = np.sin(angles).astype(np.float32)

  pos_y = np.arange(height, dtype=np.float32) / np.float32(cell_y)
  pos_x = np.arange(width, dtype=np.float32) / np.float32(cell_x)
  floor_y = np.floor(pos_y)
  floor_x = np.floor(pos_x)
  iy = floor_y.astype(np.intp)
  ix = floor_x.astype(np.intp)
  fy = (pos_y - floor_y)[:, None]  # float32 - int would promote to float64
  fx = pos_x - floor_x
  u = _fade(fy)
  v = _fade(fx)

  # noise = sum over corners (dy, dx) of wy(dy) wx(dx) (g . (fy - dy, fx - dx))
  # with wy = (1 - u, u), wx = (1 - v, v). Weights and offsets are separable,
  # so the sum over dy is done on (height, res_x + 1) arrays and only the sum
  # over dx touches full-size arrays: four gathers instead of eight and a
  # third of the full-size arithmetic of the corner-by-corner form.
  rows_y = (1.0 - u) * fy * grad_y[iy] + u * (fy - 1.0) * grad_y[iy + 1]
  rows_x = (1.0 - u) * grad_x[iy] + u * grad_x[iy + 1]
  scale = np.float32(np.sqrt(2.0))
  noise = np.zeros((height, width), np.float32)
  for dx, weight in ((0, 1.0 - v), (1, v)):
    weight = weight * scale
    noise += rows_y[:, ix + dx] * weight
    noise += rows_x[:, ix + dx] * (weight * (fx - dx))
  return noise


# The public code's Perlin threshold (synthesis.recipe 'tasad'): drawn per
# sample, uniform in this range; its noise is not rotated.
TASAD_THRESHOLD_RANGE = (0.0, 1.0)


def perlin_mask(
    shape: tuple[int, int],
    rng: np.random.Generator,
    config: ml_collections.ConfigDict,
) -> np.ndarray:
  """An anomaly shape: Perlin noise above a threshold, by `config.recipe`.

  The lattice is 2^a x 2^b with a, b uniform in {0..perlin_max_exponent}, so
  blobs range from image-sized to a few pixels and are often elongated.

  - 'draem': the noise is rotated by U(-perlin_rotation, perlin_rotation)
    about the centre with bilinear interpolation and zero fill (imgaug's
    Affine defaults), so the corners outside the rotated field are never
    masked, and thresholded at perlin_threshold. PIL rotates float32 images
    bilinearly like scipy.ndimage.rotate(reshape=False, order=1), about four
    times faster.
  - 'tasad' (the public code): no rotation; the threshold is drawn from
    TASAD_THRESHOLD_RANGE per sample (larger masks on average, some empty).

  Args:
    shape: (height, width) of the mask.
    rng: random generator.
    config: the synthesis config (recipe, perlin_max_exponent, and for
      'draem' perlin_rotation and perlin_threshold).

  Returns:
    bool array of the given shape.
  """
  exp_y, exp_x = rng.integers(0, config.perlin_max_exponent + 1, size=2)
  noise = perlin_noise(shape, (2**int(exp_y), 2**int(exp_x)), rng)
  if config.recipe == 'tasad':
    return noise > rng.uniform(*TASAD_THRESHOLD_RANGE)
  angle = rng.uniform(-config.perlin_rotation, config.perlin_rotation)
  rotated = Image.fromarray(noise).rotate(
      angle, resample=Image.Resampling.BILINEAR, fillcolor=0.0)
  return np.asarray(rotated) > config.perlin_threshold
