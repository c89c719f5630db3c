"""Tests of the JAX SLIC (twostage_jax/methods/two_stage/device_slic.py) against scikit-image's."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage import segmentation
from skimage.util import regular_grid

from twostage_jax.data import images
from twostage_jax.data import mvtec
from twostage_jax.methods.two_stage import device_slic

import compile_speed  # tests/compile_speed.py

_REAL_DATA_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data', 'mvtec_ad')
# configs/mvtec.py's `refine` values, at the image size of a run.
_REFINE = {'n_segments': 250, 'compactness': 8.0, 'sigma': 1.0}
_REAL_SIZE = 256
_SMALL = {'n_segments': 60, 'compactness': 8.0, 'sigma': 1.0}  # 64 centres on 48 x 48


def _blocks(seed: int) -> np.ndarray:
  """48 x 48 float64 RGB: 6 x 6 flat colour blocks plus Gaussian noise."""
  rng = np.random.default_rng(seed)
  image = np.repeat(np.repeat(rng.random((6, 6, 3)), 8, axis=0), 8, axis=1)
  return np.clip(image + rng.normal(0, 0.05, image.shape), 0, 1)


def _gradient() -> np.ndarray:
  """48 x 48 float64 RGB: a smooth two-way colour ramp with faint noise."""
  y, x = np.mgrid[:48, :48] / 47
  ramp = np.stack([y, x, 0.5 * (1 - y)], axis=-1)
  return np.clip(ramp + np.random.default_rng(0).normal(0, 0.01, ramp.shape), 0, 1)


def _skimage(image: np.ndarray, connectivity: bool, n_segments: int, compactness: float,
             sigma: float) -> np.ndarray:
  return segmentation.slic(image, n_segments=n_segments, compactness=compactness, sigma=sigma,
                           enforce_connectivity=connectivity, start_label=0, channel_axis=-1)


def _jax(batch: np.ndarray, connectivity: bool, **settings) -> np.ndarray:
  return np.asarray(device_slic.slic_labels(batch.astype(np.float32),
                                            enforce_connectivity=connectivity, **settings))


def test_synthetic_images_match_skimage():
  """Flat blocks and a smooth ramp: the float32 k-means reproduces skimage's."""
  batch = np.stack([_blocks(0), _blocks(1), _gradient()])
  labels = _jax(batch, False, **_SMALL)
  for image, ours in zip(batch, labels):
    assert device_slic.matched_agreement(ours, _skimage(image, False, **_SMALL)) >= 0.99


def test_emptied_segment_matches_skimage():
  """A centre that loses all its pixels (NaN mean in skimage) stays empty here too."""
  settings = {**_SMALL, 'compactness': 1.0}
  image = _blocks(22)
  reference = _skimage(image, False, **settings)
  centres = np.zeros((1, 48, 48))[regular_grid((1, 48, 48), settings['n_segments'])].size
  assert len(np.unique(reference)) < centres  # the case is exercised
  ours = _jax(image[None], False, **settings)[0]
  assert device_slic.matched_agreement(ours, reference) >= 0.99
  assert set(np.unique(ours)) == set(np.unique(reference))


def _real_images() -> np.ndarray:
  """Two test images (one good, one defective) of bottle and of grid, 256 x 256."""
  if not all(os.path.isdir(os.path.join(_REAL_DATA_DIR, category))
             for category in ('bottle', 'grid')):
    pytest.skip(f'real MVTec AD bottle/grid not found under {_REAL_DATA_DIR}')
  picked = []
  for category in ('bottle', 'grid'):
    folder = mvtec.category_dir(_REAL_DATA_DIR, category)
    files = mvtec.test_files(_REAL_DATA_DIR, category)
    good = files.paths[files.defect_types.index(mvtec.GOOD)]
    defective = next(path for path, defect in zip(files.paths, files.defect_types)
                     if defect != mvtec.GOOD)
    picked += [images.read_rgb(os.path.join(folder, path), _REAL_SIZE)
               for path in (good, defective)]
  return np.stack(picked)


@pytest.mark.parametrize('connectivity', [False, True])
def test_real_images_match_skimage(connectivity):
  """Bottle and grid at the refine settings, connectivity off and on (both exact rules)."""
  batch = _real_images()
  # 4 images of 256 x 256: compiled as users' are, to run fast.
  labels = np.asarray(compile_speed.at_xla_defaults(
      device_slic.slic_labels, batch, enforce_connectivity=connectivity, **_REFINE)(batch))
  for image, ours in zip(batch, labels):
    reference = _skimage(image, connectivity, **_REFINE)
    assert device_slic.matched_agreement(ours, reference) >= 0.95


def test_batch_equals_one_at_a_time():
  batch = np.stack([_blocks(2), _gradient(), _blocks(3)])
  together = _jax(batch, True, **_SMALL)
  for image, labels in zip(batch, together):
    np.testing.assert_array_equal(_jax(image[None], True, **_SMALL)[0], labels)


def test_connectivity_equals_skimage_kernel():
  """Random label maps: the parallel pass equals skimage's sequential kernel.

  The maps exercise what SLIC output rarely shows: regions split at
  max_size, orphan regions with no labelled neighbour, chains of adoptions.
  """
  kernel = pytest.importorskip('skimage.segmentation._slic')
  enforce = jax.jit(device_slic._enforce_connectivity)  # sizes traced: one compilation
  rng = np.random.default_rng(0)
  for _ in range(20):
    block = int(rng.integers(1, 8))
    coarse = rng.integers(0, int(rng.integers(2, 10)), (32 // block + 1, 40 // block + 1))
    labels = coarse.repeat(block, axis=0).repeat(block, axis=1)[:32, :40]
    labels = np.where(rng.random(labels.shape) < 0.2 * rng.random(),
                      rng.integers(0, 10, labels.shape), labels)
    min_size = int(rng.choice([0, 1, 5, 20, 60]))
    max_size = max(int(rng.choice([10, 50, 200, 2000])), min_size + 1)
    expected = kernel._enforce_label_connectivity_cython(
        labels[None].astype(np.intp), min_size, max_size, start_label=0)[0]
    ours = enforce(jnp.asarray(labels, jnp.int32), min_size, max_size)
    np.testing.assert_array_equal(np.asarray(ours), expected)


def test_connected_regions_of_minimum_size():
  """SLIC output: each label one 4-connected region, none below min_size.

  skimage's rule (reproduced) can break both only for a small first region
  without a labelled neighbour, which these images do not have.
  """
  batch = np.stack([_blocks(4), _gradient()])
  labels = _jax(batch, True, **_SMALL)
  centres = np.zeros((1, 48, 48))[regular_grid((1, 48, 48), _SMALL['n_segments'])].size
  min_size = int(0.5 * 48 * 48 / centres)
  for image_labels in labels:
    for label in np.unique(image_labels):
      region = image_labels == label
      assert ndimage.label(region)[1] == 1  # scipy's default structure: 4-connectivity
      assert region.sum() >= min_size


def test_uint8_and_float_inputs_agree():
  image = (_blocks(5) * 255).round().astype(np.uint8)
  from_uint8 = device_slic.slic_labels(image[None], enforce_connectivity=False, **_SMALL)
  from_float = device_slic.slic_labels(image[None] / np.float32(255), enforce_connectivity=False,
                                       **_SMALL)
  np.testing.assert_array_equal(np.asarray(from_uint8), np.asarray(from_float))
