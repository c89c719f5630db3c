"""Built-in demo dataset: procedural categories in the MVTec AD layout.

It lets the toolkit train and evaluate with no download. `weave` is a texture
(a twill-woven fabric), `washer` an object (a metal ring on a plain
background). Test defects are drawn by a different process than the training
pseudo-anomalies (Perlin blends and superpixel pastes of texture images), so
the demo measures generalisation rather than recall of the synthesiser.

Every image has its own seed, derived from (seed, category, split, defect
type, index), so the data is reproducible and independent of write order.
Masks are exact: a pixel is in the mask iff the defect changed its value.
"""

from collections.abc import Callable
import dataclasses
import os
import shutil
import tempfile
import zlib

import ml_collections
import numpy as np
from PIL import Image

from twostage_jax.data import cache

# Bump whenever the generated pixels change, so old cached copies are unused.
GENERATOR_VERSION = 1

# Smallest defect accepted, as fractions of the image width / area, so that
# defects stay visible after downscaling (e.g. 128 -> 64 pixels).
_MIN_EXTENT = 0.08
_MIN_AREA = 0.003
_MAX_TRIES = 100


@dataclasses.dataclass(frozen=True)
class _Scene:
  """A normal image before quantisation, with what defects need to know.

  Attributes:
    image: float (H, W, 3) in [0, 255].
    background: float (H, W, 3), what shows through a hole in the object.
    body: float (H, W) in [0, 1], coverage of the object (1 for textures).
  """
  image: np.ndarray
  background: np.ndarray
  body: np.ndarray


# A defect's paint: the bool region it covers and the float values put there.
_Paint = tuple[np.ndarray, np.ndarray]
_Defect = Callable[[_Scene, np.random.Generator], _Paint]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates (y, x)."""
  coords = np.arange(size, dtype=np.float32) + 0.5
  yy, xx = np.meshgrid(coords, coords, indexing='ij')
  return yy, xx


def _noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
  return scale * rng.standard_normal((size, size, 3), dtype=np.float32)


def _blob(size: int, rng: np.random.Generator, centre: np.ndarray,
          radius: float, roughness: float, aspect: float = 1.0) -> np.ndarray:
  """An irregular, optionally elongated disc: a radius with random harmonics."""
  yy, xx = _grid(size)
  angle = rng.uniform(0.0, np.pi)
  dy, dx = yy - centre[0], xx - centre[1]
  along = dx * np.cos(angle) + dy * np.sin(angle)
  across = -dx * np.sin(angle) + dy * np.cos(angle)
  distance = np.hypot(along / aspect, across)
  theta = np.arctan2(across, along)
  orders = np.arange(2, 6)
  amplitudes = rng.uniform(0.0, roughness, orders.size) / orders
  phases = rng.uniform(0.0, 2 * np.pi, orders.size)
  edge = radius * (1.0 + np.sum(
      amplitudes * np.cos(orders * theta[..., None] + phases), axis=-1))
  return distance <= edge


def _stroke(size: int, rng: np.random.Generator, centre: np.ndarray,
            length: float, width: float) -> np.ndarray:
  """A straight or slightly bent band: a quadratic Bezier curve of `width`."""
  yy, xx = _grid(size)
  angle = rng.uniform(0.0, np.pi)
  direction = np.array([np.sin(angle), np.cos(angle)])
  normal = np.array([direction[1], -direction[0]])
  start = centre - direction * length / 2
  end = centre + direction * length / 2
  control = centre + normal * rng.uniform(-0.25, 0.25) * length
  t = np.linspace(0.0, 1.0, int(np.ceil(4 * length / width)) + 1)[:, None]
  points = (1 - t)**2 * start + 2 * (1 - t) * t * control + t**2 * end
  squared = ((yy[..., None] - points[:, 0])**2 +
             (xx[..., None] - points[:, 1])**2)
  return squared.min(axis=-1) <= (width / 2)**2


def _random_pixel(rng: np.random.Generator, where: np.ndarray) -> np.ndarray:
  """(y, x) centre of a random pixel among those where `where` holds."""
  index = rng.choice(np.flatnonzero(where))
  return np.array(np.unravel_index(index, where.shape), dtype=np.float64) + 0.5


def _line_values(size: int, rng: np.random.Generator, bright: float,
                 dark: float) -> np.ndarray:
  """A flat bright or dark paint with fine noise, for scratches."""
  level = bright if rng.random() < 0.5 else dark
  return level + _noise(rng, size, 4.0)


# --- weave: a twill-woven fabric texture -------------------------------------


def _render_weave(rng: np.random.Generator, size: int) -> _Scene:
  """A 2/1 twill of indigo warp over off-white weft, with small jitter.

  The thread pattern is drawn at twice the resolution and averaged down, so
  the slightly rotated threads do not alias into seams.
  """
  fine = 2 * size
  yy, xx = _grid(fine)
  period = fine / 12
  angle = np.deg2rad(rng.uniform(-2.0, 2.0))
  cos, sin = float(np.cos(angle)) / period, float(np.sin(angle)) / period
  phase_u, phase_v = rng.uniform(0.0, 3.0, 2).tolist()
  u = xx * cos + yy * sin + phase_u
  v = yy * cos - xx * sin + phase_v
  across_u = np.sqrt(np.sin(np.pi * (u % 1.0)))
  across_v = np.sqrt(np.sin(np.pi * (v % 1.0)))
  warp_on_top = (np.floor(u) - np.floor(v)) % 3 != 0
  warp_shade = np.where(
      warp_on_top, 0.35 + 0.65 * across_u * (0.6 + 0.4 * across_v), 0.0)
  weft_shade = np.where(
      warp_on_top, 0.0, 0.35 + 0.65 * across_v * (0.6 + 0.4 * across_u))

  def downsample(shade: np.ndarray) -> np.ndarray:
    return shade.reshape(size, 2, size, 2).mean(axis=(1, 3))[..., None]

  brightness = rng.uniform(0.95, 1.05)
  warp = (np.array([60.0, 85.0, 150.0]) + rng.normal(0, 4, 3)) * brightness
  weft = (np.array([200.0, 195.0, 175.0]) + rng.normal(0, 4, 3)) * brightness
  image = downsample(warp_shade) * warp + downsample(weft_shade) * weft
  image += _noise(rng, size, 3.0)
  background = np.array([30.0, 25.0, 22.0]) + _noise(rng, size, 3.0)
  return _Scene(np.clip(image, 0, 255), background, np.ones((size, size)))


def _weave_scratch(scene: _Scene, rng: np.random.Generator) -> _Paint:
  size = scene.body.shape[0]
  region = _stroke(size, rng, rng.uniform(0.2, 0.8, 2) * size,
                   length=rng.uniform(0.25, 0.5) * size,
                   width=rng.uniform(0.025, 0.04) * size)
  return region, _line_values(size, rng, bright=240.0, dark=20.0)


def _weave_hole(scene: _Scene, rng: np.random.Generator) -> _Paint:
  size = scene.body.shape[0]
  region = _blob(size, rng, rng.uniform(0.15, 0.85, 2) * size,
                 radius=rng.uniform(0.05, 0.1) * size, roughness=0.35)
  return region, scene.background


def _weave_stain(scene: _Scene, rng: np.random.Generator) -> _Paint:
  """A tinted blob: the weave stays visible under a strong colour shift."""
  size = scene.body.shape[0]
  centre = rng.uniform(0.2, 0.8, 2) * size
  radius = rng.uniform(0.08, 0.15) * size
  region = _blob(size, rng, centre, radius, roughness=0.2,
                 aspect=rng.uniform(1.0, 1.7))
  tints = np.array([[80.0, 60.0, -70.0], [75.0, -30.0, -60.0],
                    [10.0, 55.0, -65.0]])  # Yellow, rust, green.
  tint = tints[rng.integers(len(tints))] * rng.uniform(0.9, 1.2)
  yy, xx = _grid(size)
  falloff = np.exp(-((yy - centre[0])**2 + (xx - centre[1])**2) / radius**2)
  return region, scene.image + (0.7 + 0.3 * falloff)[..., None] * tint


# --- washer: a metal ring on a plain background ------------------------------


def _render_washer(rng: np.random.Generator, size: int) -> _Scene:
  """A turned metal ring, jittered in position and lighting direction."""
  yy, xx = _grid(size)
  centre = size / 2 + rng.normal(0.0, 0.015 * size, 2)
  dy, dx = yy - centre[0], xx - centre[1]
  r, phi = np.hypot(dy, dx), np.arctan2(dy, dx)
  outer = 0.40 * size * rng.uniform(0.98, 1.02)
  inner = 0.19 * size * rng.uniform(0.98, 1.02)
  body = np.clip(outer - r + 0.5, 0, 1) * np.clip(r - inner + 0.5, 0, 1)
  middle, half = (outer + inner) / 2, (outer - inner) / 2
  bevel = 1.0 - 0.3 * ((r - middle) / half)**2
  turning_marks = 0.04 * np.sin(2 * np.pi * r / (size / 50))
  light = np.deg2rad(-45.0 + rng.uniform(-10.0, 10.0))
  highlight = 0.18 * np.cos(phi - light)
  shade = bevel + turning_marks + highlight
  metal = np.array([150.0, 152.0, 158.0]) * shade[..., None]
  metal += _noise(rng, size, 3.0)
  background = (np.array([48.0, 58.0, 52.0]) * rng.uniform(0.95, 1.05) +
                _noise(rng, size, 2.0))
  image = body[..., None] * metal + (1 - body[..., None]) * background
  return _Scene(np.clip(image, 0, 255), background, body)


def _washer_missing(scene: _Scene, rng: np.random.Generator) -> _Paint:
  """A notch bitten out of the inner or outer rim, showing the background."""
  size = scene.body.shape[0]
  rim = (scene.body > 0) & (scene.body < 1)
  region = _blob(size, rng, _random_pixel(rng, rim),
                 radius=rng.uniform(0.07, 0.12) * size, roughness=0.15)
  return region & (scene.body > 0), scene.background


def _washer_foreign(scene: _Scene, rng: np.random.Generator) -> _Paint:
  """A striped particle of another colour lying on or next to the ring."""
  size = scene.body.shape[0]
  centre = (_random_pixel(rng, scene.body >= 1) +
            rng.normal(0.0, 0.03 * size, 2))
  region = _blob(size, rng, centre, radius=rng.uniform(0.04, 0.07) * size,
                 roughness=0.3, aspect=rng.uniform(1.0, 2.0))
  colours = np.array([[225.0, 125.0, 35.0], [70.0, 165.0, 75.0],
                      [185.0, 45.0, 40.0], [50.0, 90.0, 200.0]])
  colour = colours[rng.integers(len(colours))]
  yy, xx = _grid(size)
  angle = rng.uniform(0.0, np.pi)
  stripes = np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) /
                   (size / 25))
  values = (0.8 + 0.2 * stripes)[..., None] * colour + _noise(rng, size, 4.0)
  return region, values


def _washer_scratch(scene: _Scene, rng: np.random.Generator) -> _Paint:
  size = scene.body.shape[0]
  solid = scene.body >= 1
  region = _stroke(size, rng, _random_pixel(rng, solid),
                   length=rng.uniform(0.2, 0.35) * size,
                   width=rng.uniform(0.025, 0.04) * size)
  return region & solid, _line_values(size, rng, bright=250.0, dark=45.0)


_CATEGORIES: dict[str, tuple[Callable[[np.random.Generator, int], _Scene],
                             dict[str, _Defect]]] = {
    'weave': (_render_weave, {
        'hole': _weave_hole,
        'scratch': _weave_scratch,
        'stain': _weave_stain,
    }),
    'washer': (_render_washer, {
        'foreign': _washer_foreign,
        'missing': _washer_missing,
        'scratch': _washer_scratch,
    }),
}
DEMO_CATEGORIES = tuple(_CATEGORIES)
DEMO_DEFECTS = {name: tuple(defects)
                for name, (_, defects) in _CATEGORIES.items()}


def _to_uint8(image: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_normal(category: str, rng: np.random.Generator,
                  size: int) -> np.ndarray:
  """One defect-free image, uint8 (size, size, 3)."""
  render, _ = _CATEGORIES[category]
  return _to_uint8(render(rng, size).image)


def render_defective(
    category: str, defect: str, rng: np.random.Generator,
    size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(normal image, the same image with a defect, exact bool mask).

  The mask is computed from the quantised pixels, so it is exactly the set of
  pixels whose value differs. Defects too small to survive downscaling are
  redrawn.
  """
  render, defects = _CATEGORIES[category]
  scene = render(rng, size)
  normal = _to_uint8(scene.image)
  for _ in range(_MAX_TRIES):
    region, values = defects[defect](scene, rng)
    defective = _to_uint8(np.where(region[..., None], values, scene.image))
    mask = np.any(defective != normal, axis=-1)
    rows, cols = np.nonzero(mask)
    if (mask.sum() >= _MIN_AREA * size**2 and
        max(np.ptp(rows), np.ptp(cols)) + 1 >= _MIN_EXTENT * size):
      return normal, defective, mask
  raise RuntimeError(f'could not draw a visible {defect!r} on {category!r}')


def _rng(seed: int, category: str, split: str, defect: str,
         index: int) -> np.random.Generator:
  """The generator of one image, independent of the order images are made."""
  words = [zlib.crc32(text.encode()) for text in (category, split, defect)]
  return np.random.default_rng(np.random.SeedSequence([seed, *words, index]))


def _save_png(path: str, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, compress_level=1)


def _write_category(root: str, category: str,
                    config_demo: ml_collections.ConfigDict) -> None:
  """Writes one category's train/test/ground_truth folders under `root`."""
  seed, size = config_demo.seed, config_demo.image_size
  folder = os.path.join(root, category)
  for split, count in (('train', config_demo.num_train),
                       ('test', config_demo.num_test_good)):
    for i in range(count):
      image = render_normal(category, _rng(seed, category, split, 'good', i),
                            size)
      _save_png(os.path.join(folder, split, 'good', f'{i:03d}.png'), image)
  for defect in DEMO_DEFECTS[category]:
    for i in range(config_demo.num_test_per_defect):
      _, image, mask = render_defective(
          category, defect, _rng(seed, category, 'test', defect, i), size)
      _save_png(os.path.join(folder, 'test', defect, f'{i:03d}.png'), image)
      _save_png(
          os.path.join(folder, 'ground_truth', defect, f'{i:03d}_mask.png'),
          mask.astype(np.uint8) * 255)


def demo_folder_name(config_demo: ml_collections.ConfigDict) -> str:
  """Names a cached copy by everything that changes its pixels."""
  c = config_demo
  return (f'demo-v{GENERATOR_VERSION}-seed{c.seed}-{c.image_size}px'
          f'-train{c.num_train}-good{c.num_test_good}'
          f'-defect{c.num_test_per_defect}')


def _check(config_demo: ml_collections.ConfigDict) -> None:
  if config_demo.image_size < 32:
    raise ValueError(f'demo.image_size must be >= 32, got '
                     f'{config_demo.image_size}')
  if config_demo.num_train < 1:
    raise ValueError(f'demo.num_train must be >= 1, got '
                     f'{config_demo.num_train}')
  if min(config_demo.num_test_good, config_demo.num_test_per_defect) < 0:
    raise ValueError('demo.num_test_good and demo.num_test_per_defect must '
                     'be >= 0')


def ensure_demo_dataset(cache_dir: str,
                        config_demo: ml_collections.ConfigDict) -> str:
  """Returns a data_dir holding the demo categories, generating it once.

  The data is written into a temporary sibling folder and renamed into place,
  so an interrupted run never leaves a partial dataset behind, and of two
  processes racing, the loser discards its identical copy.

  Args:
    cache_dir: `config.cache_dir` ('' = the default cache folder).
    config_demo: `config.demo` (seed, image_size and the image counts).

  Returns:
    A folder in the MVTec AD layout with one subfolder per DEMO_CATEGORIES.
  """
  _check(config_demo)
  root = cache.default_cache_dir(cache_dir)
  name = demo_folder_name(config_demo)
  data_dir = os.path.join(root, name)
  if os.path.isdir(data_dir):
    return data_dir
  os.makedirs(root, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f'.{name}.', dir=root)
  try:
    for category in DEMO_CATEGORIES:
      _write_category(staging, category, config_demo)
    try:
      os.rename(staging, data_dir)
    except OSError:
      if not os.path.isdir(data_dir):
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return data_dir
