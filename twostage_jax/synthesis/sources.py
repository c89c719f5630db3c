"""Anomaly-source images: a user folder (e.g. DTD) or a built-in offline set.

The built-in set exists so that training runs without downloads: the images
bundled inside the scikit-image wheel plus a few procedural textures drawn
from a fixed seed, so every machine gets the same set.
"""

import functools
import os

import numpy as np
from PIL import Image
from scipy import spatial
from skimage import data as skimage_data

from twostage_jax.data import images
from twostage_jax.data.mvtec import IMAGE_EXTENSIONS
from twostage_jax.synthesis import perlin

# Images shipped inside the scikit-image wheel (no pooch download needed).
_SKIMAGE_NAMES = (
    'brick', 'grass', 'gravel', 'coins', 'moon', 'camera', 'coffee',
    'chelsea', 'astronaut', 'rocket', 'immunohistochemistry',
    'hubble_deep_field', 'retina', 'cell', 'page', 'text',
)
_PROCEDURAL_SEED = 0


def image_files(source_dir: str) -> list[str]:
  """All image files under source_dir, sorted so the order is reproducible."""
  if not os.path.isdir(source_dir):
    raise ValueError(
        f'Anomaly source folder {source_dir!r} does not exist or is not a '
        'folder.')
  paths = []
  for root, _, names in os.walk(source_dir):
    paths.extend(os.path.join(root, name) for name in names
                 if name.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ValueError(
        f'Anomaly source folder {source_dir!r} holds no images '
        f'({", ".join(IMAGE_EXTENSIONS)}).')
  return sorted(paths)


def _resize(image: np.ndarray, image_size: int) -> np.ndarray:
  """uint8 RGB (image_size, image_size, 3) from a grayscale/RGB/RGBA array."""
  resized = Image.fromarray(image).convert('RGB').resize(
      (image_size, image_size), resample=Image.Resampling.BILINEAR)
  return np.asarray(resized, dtype=np.uint8)


@functools.cache
def _skimage_images() -> tuple[tuple[str, np.ndarray], ...]:
  """The bundled scikit-image images that load here without a download."""
  images = []
  for name in _SKIMAGE_NAMES:
    try:
      images.append((name, getattr(skimage_data, name)()))
    except (ImportError, OSError, ValueError, AttributeError):
      continue
  return tuple(images)


def _normalise(x: np.ndarray) -> np.ndarray:
  """Stretches each channel to [0, 1]."""
  low = x.min(axis=(0, 1), keepdims=True)
  high = x.max(axis=(0, 1), keepdims=True)
  return (x - low) / np.maximum(high - low, 1e-6)


def _fbm(size: int, rng: np.random.Generator, octaves: int) -> np.ndarray:
  """Fractal Perlin noise (octave k: lattice 2^(k+1), amplitude 2^-k)."""
  return sum(perlin.perlin_noise((size, size), (2**(k + 1),) * 2, rng)
             * 0.5**k for k in range(octaves))


def _colour_fbm(size: int, rng: np.random.Generator) -> np.ndarray:
  """Cloudy colour noise: independent fBm per channel."""
  return _normalise(np.stack([_fbm(size, rng, 5) for _ in range(3)], -1))


def _marble(size: int, rng: np.random.Generator) -> np.ndarray:
  """Two-colour veins: a sine of an oblique ramp displaced by fBm."""
  coords = np.arange(size, dtype=np.float32) / size
  angle = rng.uniform(0, np.pi)
  ramp = (np.cos(angle) * coords[:, None] + np.sin(angle) * coords[None, :])
  veins = 0.5 + 0.5 * np.sin(2 * np.pi * (6 * ramp + 2 * _fbm(size, rng, 4)))
  colours = rng.uniform(0, 1, size=(2, 3))
  return colours[0] + veins[..., None] * (colours[1] - colours[0])


def _stripes(size: int, rng: np.random.Generator) -> np.ndarray:
  """Oblique sinusoidal stripes, a different low frequency per channel.

  Higher frequencies make SLIC at n_segments=30 collapse into one segment.
  """
  coords = np.arange(size, dtype=np.float32) / size
  angle = rng.uniform(0, np.pi)
  ramp = (np.cos(angle) * coords[:, None] + np.sin(angle) * coords[None, :])
  phase = np.stack([np.sin(2 * np.pi * f * ramp) for f in (3, 5, 7)], -1)
  return _normalise(phase * rng.uniform(0.2, 1.0, size=3))


def _tiles(size: int, rng: np.random.Generator) -> np.ndarray:
  """Rotated 8 x 8 grid of tiles, each with its own colour.

  A two-colour checkerboard would also collapse into one SLIC segment.
  """
  coords = np.arange(size, dtype=np.float32)
  angle = rng.uniform(0, np.pi / 2)
  u = np.cos(angle) * coords[:, None] + np.sin(angle) * coords[None, :]
  v = -np.sin(angle) * coords[:, None] + np.cos(angle) * coords[None, :]
  cell = size / 8
  row = np.floor(u / cell).astype(np.intp) % 16
  col = np.floor(v / cell).astype(np.intp) % 16
  colours = rng.uniform(0, 1, size=(16, 16, 3))
  return colours[row, col]


def _voronoi(size: int, rng: np.random.Generator) -> np.ndarray:
  """Cellular texture: each pixel takes the colour of its nearest seed."""
  seeds = rng.uniform(0, size, size=(48, 2))
  colours = rng.uniform(0, 1, size=(48, 3))
  grid = np.stack(np.mgrid[0:size, 0:size], -1).reshape(-1, 2)
  distance, nearest = spatial.cKDTree(seeds).query(grid, k=2)
  edge = np.clip((distance[:, 1] - distance[:, 0]) / 3, 0, 1)
  texture = colours[nearest[:, 0]] * edge[:, None]
  return texture.reshape(size, size, 3)


_PROCEDURAL = (
    ('perlin_fbm', _colour_fbm),
    ('marble', _marble),
    ('stripes', _stripes),
    ('tiles', _tiles),
    ('voronoi', _voronoi),
)


def _builtin_sources(image_size: int) -> list[np.ndarray]:
  sources = [_resize(image, image_size) for _, image in _skimage_images()]
  rng = np.random.default_rng(_PROCEDURAL_SEED)
  for _, make in _PROCEDURAL:
    texture = np.clip(make(image_size, rng), 0.0, 1.0)
    sources.append(np.rint(texture * 255.0).astype(np.uint8))
  return sources


def load_anomaly_sources(source_dir: str,
                         image_size: int) -> list[np.ndarray]:
  """Loads the anomaly-source images as uint8 (size, size, 3) RGB arrays.

  Args:
    source_dir: folder searched recursively for png/jpg/jpeg/bmp/tif/tiff
      files (sorted by path); '' selects the built-in set.
    image_size: side length every source is resized to (bilinear).

  Returns:
    The source images.

  Raises:
    ValueError: the folder does not exist or holds no images, or an image
      cannot be decoded (the message names the path).
  """
  if not source_dir:
    return _builtin_sources(image_size)
  return [images.read_rgb(path, image_size) for path in image_files(source_dir)]


def describe_sources(source_dir: str) -> str:
  """One line naming the set load_anomaly_sources(source_dir, ...) uses."""
  if source_dir:
    return (f'{len(image_files(source_dir))} anomaly source images from '
            f'{source_dir}')
  skimage_names = [name for name, _ in _skimage_images()]
  procedural_names = [name for name, _ in _PROCEDURAL]
  return (f'built-in anomaly sources: {len(skimage_names)} scikit-image '
          f'images ({", ".join(skimage_names)}) + {len(procedural_names)} '
          f'procedural textures ({", ".join(procedural_names)})')
