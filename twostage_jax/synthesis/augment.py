"""DRAEM's ten colour/geometry augmenters for anomaly textures, in NumPy/PIL.

The two-stage public code (RizwanAliQau/tasad) draws from four of them
(`TASAD_AUGMENTERS`); `POOLS` names both sets by their synthesis recipe.

Each augmenter maps a uint8 (H, W, 3) RGB image and a np.random.Generator to a
new uint8 image of the same shape. Parameter ranges are those of DRAEM's
imgaug pipeline (imgaug defaults where DRAEM passes none); they define the
augmenters rather than tune them, so they live here and not in the config.

Only `rotate` moves pixels; the other nine change colours in place. A SAIM
paste cuts the augmented texture along superpixels of the source, so
`random_augment` can carry a label image through the same rotation (nearest
neighbour): the superpixels then still follow the content that is pasted.
"""

from typing import Callable

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps

Augmenter = Callable[[np.ndarray, np.random.Generator], np.ndarray]

_LEVELS = np.arange(256, dtype=np.float32)
# Rec. 601 luma: the Y of the YCrCb space imgaug changes brightness in.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def gamma_contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """255 * (x / 255) ** gamma, gamma ~ U(0.5, 2.0) drawn per channel."""
  gamma = rng.uniform(0.5, 2.0, size=3).astype(np.float32)
  luts = _to_uint8(255.0 * (_LEVELS[:, None] / 255.0) ** gamma)
  return np.stack([luts[image[..., c], c] for c in range(3)], axis=-1)


def brightness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Multiplies luma by U(0.8, 1.2) and adds U(-30, 30), in random order.

  Only the Y of YCrCb changes (as in imgaug's MultiplyAndAddToBrightness);
  with chroma fixed, a change of Y adds the same amount to R, G and B.
  """
  mul = np.float32(rng.uniform(0.8, 1.2))
  add = np.float32(rng.uniform(-30.0, 30.0))
  x = image.astype(np.float32)
  luma = x @ _LUMA
  if rng.random() < 0.5:
    new_luma = np.clip(np.clip(luma * mul, 0.0, 255.0) + add, 0.0, 255.0)
  else:
    new_luma = np.clip(np.clip(luma + add, 0.0, 255.0) * mul, 0.0, 255.0)
  return _to_uint8(x + (new_luma - luma)[..., None])


def sharpness(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """PIL sharpness enhancement with factor U(0, 2) (0 blurs, 2 sharpens)."""
  enhanced = ImageEnhance.Sharpness(Image.fromarray(image)).enhance(
      rng.uniform(0.0, 2.0))
  return np.asarray(enhanced)


def _rgb_to_hsv(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Float RGB in [0, 1] -> hue (turns, [0, 1)), saturation, value.

  Works on channel planes: reductions over a length-3 last axis and np.mod
  are an order of magnitude slower than elementwise maximum and floor.
  """
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  value = np.maximum(np.maximum(r, g), b)
  chroma = value - np.minimum(np.minimum(r, g), b)
  safe_chroma = np.where(chroma > 0, chroma, 1.0)
  saturation = chroma / np.where(value > 0, value, 1.0)
  sector = np.where(
      value == r, (g - b) / safe_chroma,
      np.where(value == g, 2.0 + (b - r) / safe_chroma,
               4.0 + (r - g) / safe_chroma))
  hue = sector / 6.0
  hue -= np.floor(hue)
  return hue, saturation, value


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray,
                value: np.ndarray) -> np.ndarray:
  """Inverse of _rgb_to_hsv via f(n) = V - V S max(0, min(k, 4 - k, 1)).

  k = (n + 6 H) mod 6 with n = 5, 3, 1 for R, G, B.
  """
  channels = []
  for offset in (5.0, 3.0, 1.0):
    k = hue * 6.0 + offset
    k = np.where(k >= 6.0, k - 6.0, k)
    ramp = np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    channels.append(value * (1.0 - saturation * ramp))
  return np.stack(channels, axis=-1)


def hue_saturation(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Adds U(-50, 50) to hue and, separately drawn, to saturation.

  Values are on imgaug's 0..255 scale: 255 of hue is a full turn, 255 of
  saturation is full saturation.
  """
  hue_add, saturation_add = rng.uniform(-50.0, 50.0, size=2) / 255.0
  hue, saturation, value = _rgb_to_hsv(image.astype(np.float32) / 255.0)
  hue += np.float32(hue_add)
  hue -= np.floor(hue)
  saturation = np.clip(saturation + np.float32(saturation_add), 0.0, 1.0)
  return _to_uint8(255.0 * _hsv_to_rgb(hue, saturation, value))


def solarize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """With p = 0.5, inverts values >= a threshold drawn from {32..128}."""
  if rng.random() >= 0.5:
    return image.copy()
  threshold = rng.integers(32, 129)
  levels = np.arange(256, dtype=np.uint8)
  return np.where(levels >= threshold, 255 - levels, levels)[image]


def posterize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Keeps the top 1..8 bits (uniform), like PIL.ImageOps.posterize."""
  bits = int(rng.integers(1, 9))
  return image & np.uint8((0xFF << (8 - bits)) & 0xFF)


def invert(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """255 - x; takes rng only to share the augmenter signature."""
  del rng
  return 255 - image


def autocontrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """PIL autocontrast, cutting {0..20}% of each histogram end (imgaug)."""
  cutoff = int(rng.integers(0, 21))
  return np.asarray(ImageOps.autocontrast(Image.fromarray(image), cutoff))


def equalize(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """PIL histogram equalisation; takes rng only to share the signature."""
  del rng
  return np.asarray(ImageOps.equalize(Image.fromarray(image)))


# Label value of the pixels a rotation brings in from outside the image.
OUTSIDE = -1


def _rotation_angle(rng: np.random.Generator) -> float:
  return rng.uniform(-45.0, 45.0)


def rotate_labels(labels: np.ndarray, angle: float) -> np.ndarray:
  """int32 labels rotated as `rotate` turns the image, nearest neighbour.

  The same PIL rotation about the same centre, so label and pixel positions
  stay in register; pixels brought in from outside become OUTSIDE.
  """
  rotated = Image.fromarray(labels.astype(np.int32)).rotate(
      angle, resample=Image.Resampling.NEAREST, fillcolor=OUTSIDE)
  return np.asarray(rotated, dtype=np.int32)


def _rotate_by(image: np.ndarray, angle: float) -> np.ndarray:
  return np.asarray(Image.fromarray(image).rotate(angle, resample=Image.Resampling.BILINEAR))


def rotate(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Bilinear rotation by U(-45, 45) degrees about the centre, black fill."""
  return _rotate_by(image, _rotation_angle(rng))


AUGMENTERS: tuple[Augmenter, ...] = (
    gamma_contrast,
    brightness,
    sharpness,
    hue_saturation,
    solarize,
    posterize,
    invert,
    autocontrast,
    equalize,
    rotate,
)


# The public code's four (gamma contrast, multiply-and-add brightness,
# sharpness, autocontrast; no rotation), with DRAEM's ranges.
TASAD_AUGMENTERS: tuple[Augmenter, ...] = (gamma_contrast, brightness, sharpness, autocontrast)

# The augmenters of each synthesis recipe ('draem', 'tasad').
POOLS: dict[str, tuple[Augmenter, ...]] = {'draem': AUGMENTERS, 'tasad': TASAD_AUGMENTERS}


def random_augment(image: np.ndarray, rng: np.random.Generator, num: int,
                   labels: np.ndarray | None = None,
                   pool: tuple[Augmenter, ...] | None = None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
  """Applies `num` distinct augmenters of `pool`, drawn without replacement, in order.

  Args:
    image: uint8 (H, W, 3) RGB image.
    rng: random generator for the choice and for each augmenter.
    num: number of augmenters, at most len(pool).
    labels: optional integer (H, W) segment ids of `image`; they undergo
      the same rotation when `rotate` is drawn (rotate_labels) and pass the
      colour augmenters unchanged. The random draws do not depend on it.
    pool: the augmenters to draw from (a value of POOLS); None: AUGMENTERS.

  Returns:
    A new, writeable uint8 (H, W, 3) image, and the labels in its geometry
    (int32, OUTSIDE where the rotation brought in fill) or None.
  """
  if labels is not None:
    labels = labels.astype(np.int32)
  pool = AUGMENTERS if pool is None else pool
  if num > len(pool):
    raise ValueError(f'{num} augmenters asked of a pool of {len(pool)}')
  for index in rng.choice(len(pool), size=num, replace=False):
    if pool[index] is rotate:
      angle = _rotation_angle(rng)
      image = _rotate_by(image, angle)
      if labels is not None:
        labels = rotate_labels(labels, angle)
    else:
      image = pool[index](image, rng)
  return np.array(image, dtype=np.uint8), labels
