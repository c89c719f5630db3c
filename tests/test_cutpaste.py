"""Tests of AnoSeg's synthetic anomalies: hard augmentation, then CutPaste."""

import itertools
import math

import ml_collections
import numpy as np
import pytest

from configs import mvtec
from twostage_jax import synthesis
from twostage_jax.synthesis import cutpaste

SIZE = 32

# The defaults the configs carry (see the HardCutPaste docstring).
DEFAULTS = {
    'p_anomaly': 0.5,
    'p_rotation': 0.5,
    'p_perm': 0.5,
    'p_color_jitter': 0.5,
    'perm_grid': 2,
    'jitter_brightness': 0.4,
    'jitter_contrast': 0.4,
    'jitter_saturation': 0.4,
    'jitter_hue': 0.1,
    'area_min': 0.02,
    'area_max': 0.15,
    'aspect_min': 0.3,
}


def _config(**overrides) -> ml_collections.ConfigDict:
  # Merged before wrapping: ConfigDict refuses to change a field's type.
  return ml_collections.ConfigDict({**DEFAULTS, 'p_anomaly': 1.0, **overrides})


def _whole_image(**overrides) -> ml_collections.ConfigDict:
  """A config whose patch is the whole image, cut and pasted at (0, 0)."""
  return _config(**{'area_min': 1.0, 'area_max': 1.0, 'aspect_min': 1.0,
                    'p_rotation': 0.0, 'p_perm': 0.0, 'p_color_jitter': 0.0,
                    **overrides})


def _texture(seed: int = 0, low: float = 0.0, high: float = 1.0) -> np.ndarray:
  """Random noise: every patch differs from every other one."""
  rng = np.random.default_rng(1000 + seed)
  return rng.uniform(low, high, (SIZE, SIZE, 3)).astype(np.float32)


def _blocks(seed: int = 0, low: float = -0.1, high: float = 1.1) -> np.ndarray:
  """Grey 4 x 4 blocks of two levels: pasted pixels often keep their value."""
  rng = np.random.default_rng(2000 + seed)
  levels = rng.choice([low, high], (SIZE // 4, SIZE // 4, 1))
  return np.kron(levels, np.ones((4, 4, 3))).astype(np.float32)


def _bits(array: np.ndarray) -> np.ndarray:
  return array.view(np.uint32)


def _pieces(image: np.ndarray, grid: int) -> list[bytes]:
  """The grid x grid pieces of the image, as sorted bytes."""
  size_h, size_w = image.shape[0] // grid, image.shape[1] // grid
  return sorted(image[i * size_h:(i + 1) * size_h,
                      j * size_w:(j + 1) * size_w].tobytes()
                for i in range(grid) for j in range(grid))


# HardCutPaste.


@pytest.mark.parametrize('p_rotation,p_perm,p_color_jitter',
                         list(itertools.product((0.0, 1.0), repeat=3)))
def test_mask_is_exactly_the_changed_pixels(p_rotation, p_perm, p_color_jitter):
  synthesize = cutpaste.HardCutPaste(_config(
      p_rotation=p_rotation, p_perm=p_perm, p_color_jitter=p_color_jitter))
  non_empty = 0
  partial = 0  # masks that are not the whole pasted rectangle
  for seed in range(20):
    # Partly outside [0, 1].
    image = _texture(seed, -0.1, 1.1) if seed % 2 else _blocks(seed)
    clipped = np.clip(image, 0.0, 1.0)
    out, mask = synthesize(image, np.random.default_rng(seed))
    assert out.dtype == np.float32 and mask.dtype == np.float32
    assert out.shape == image.shape and mask.shape == (SIZE, SIZE)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert set(np.unique(mask)) <= {0.0, 1.0}
    changed = np.any(out != clipped, axis=-1)
    np.testing.assert_array_equal(mask, changed.astype(np.float32))
    outside = mask == 0
    np.testing.assert_array_equal(_bits(out[outside]), _bits(clipped[outside]))
    non_empty += changed.any()
    if changed.any():
      rows = np.flatnonzero(changed.any(axis=1))
      cols = np.flatnonzero(changed.any(axis=0))
      partial += not changed[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
  assert non_empty >= 12
  assert partial > 0


def test_same_seed_same_output_different_seeds_differ():
  synthesize = cutpaste.HardCutPaste(_config())
  image = _texture()
  out_a, mask_a = synthesize(image, np.random.default_rng(3))
  out_b, mask_b = synthesize(image, np.random.default_rng(3))
  np.testing.assert_array_equal(_bits(out_a), _bits(out_b))
  np.testing.assert_array_equal(mask_a, mask_b)
  out_c, mask_c = synthesize(image, np.random.default_rng(4))
  assert not np.array_equal(out_a, out_c) or not np.array_equal(mask_a, mask_c)


def test_input_is_not_modified():
  image = _texture()
  copy = image.copy()
  cutpaste.HardCutPaste(_config(p_rotation=1.0, p_perm=1.0, p_color_jitter=1.0))(
      image, np.random.default_rng(0))
  np.testing.assert_array_equal(_bits(image), _bits(copy))


def test_no_anomaly_returns_the_clipped_image_and_an_empty_mask():
  synthesize = cutpaste.HardCutPaste(_config(p_anomaly=0.0))
  image = _texture(0, -0.5, 1.5)
  for seed in range(10):
    out, mask = synthesize(image, np.random.default_rng(seed))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, np.clip(image, 0.0, 1.0))
    assert not mask.any() and mask.shape == (SIZE, SIZE)


def test_mask_fits_in_the_largest_patch_and_is_mostly_non_empty():
  config = _config()
  synthesize = cutpaste.HardCutPaste(config)
  # Sides are rounded from sqrt(area * aspect) and sqrt(area / aspect).
  largest_area = config.area_max * SIZE * SIZE
  longest = math.sqrt(largest_area / config.aspect_min) + 0.5
  shortest = math.sqrt(largest_area * config.aspect_min) + 0.5
  non_empty = 0
  for seed in range(50):
    _, mask = synthesize(_texture(seed), np.random.default_rng(seed))
    if not mask.any():
      continue
    non_empty += 1
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert max(height, width) <= longest
    assert mask.sum() <= height * width <= longest * shortest
  assert non_empty >= 45


def test_whole_image_patch_without_augmentation_changes_nothing():
  synthesize = cutpaste.HardCutPaste(_whole_image())
  image = _texture()
  for seed in range(5):
    out, mask = synthesize(image, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, image)
    assert not mask.any()


def test_rotation_turns_the_copy_by_one_to_three_quarters():
  synthesize = cutpaste.HardCutPaste(_whole_image(p_rotation=1.0))
  image = _texture()
  turns = set()
  for seed in range(20):
    out, mask = synthesize(image, np.random.default_rng(seed))
    matches = [k for k in range(4)
               if np.array_equal(out, np.rot90(image, k, axes=(0, 1)))]
    assert len(matches) == 1 and matches[0] != 0
    turns.add(matches[0])
    assert mask.all()  # noise: (almost surely) every pixel moved
  assert turns == {1, 2, 3}


def test_perm_shuffles_the_pieces_of_the_copy():
  synthesize = cutpaste.HardCutPaste(_whole_image(p_perm=1.0, perm_grid=4))
  image = _texture()
  for seed in range(10):
    out, _ = synthesize(image, np.random.default_rng(seed))
    assert _pieces(out, 4) == _pieces(image, 4)
    assert not np.array_equal(out, image)


def test_color_jitter_of_the_copy_scales_the_brightness():
  synthesize = cutpaste.HardCutPaste(_whole_image(
      p_color_jitter=1.0, jitter_contrast=0.0, jitter_saturation=0.0,
      jitter_hue=0.0))
  image = _texture(0, 0.1, 0.5)  # stays below 1 for any factor <= 1.4
  for seed in range(5):
    out, _ = synthesize(image, np.random.default_rng(seed))
    ratio = out / image
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-6)
    assert 0.6 - 1e-6 <= ratio.flat[0] <= 1.4 + 1e-6


@pytest.mark.parametrize('field,value', [
    ('p_anomaly', -0.1), ('p_anomaly', 1.5), ('p_anomaly', math.nan),
    ('p_rotation', 1.1), ('p_rotation', -1.0),
    ('p_perm', -0.5), ('p_perm', 2.0),
    ('p_color_jitter', 1.01), ('p_color_jitter', -0.01),
    ('perm_grid', 1), ('perm_grid', 0), ('perm_grid', 2.5), ('perm_grid', True),
    ('jitter_brightness', -0.1), ('jitter_contrast', -1.0),
    ('jitter_saturation', -0.5), ('jitter_hue', 0.6), ('jitter_hue', -0.1),
    ('area_min', 0.0), ('area_min', 1.5), ('area_max', 0.0), ('area_max', 1.1),
    ('aspect_min', 0.0), ('aspect_min', 1.5), ('aspect_min', -0.3),
])
def test_invalid_config_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    cutpaste.HardCutPaste(_config(**{field: value}))


def test_area_min_above_area_max_is_rejected():
  with pytest.raises(ValueError, match='area_min'):
    cutpaste.HardCutPaste(_config(area_min=0.5, area_max=0.2))


@pytest.mark.parametrize('shape', [(SIZE, SIZE), (SIZE, SIZE, 4), (SIZE, SIZE, 1),
                                   (SIZE, 2 * SIZE, 3)])
def test_bad_image_shape_is_rejected(shape):
  synthesize = cutpaste.HardCutPaste(_config())
  with pytest.raises(ValueError, match=repr(shape).replace('(', r'\(').replace(')', r'\)')):
    synthesize(np.zeros(shape, np.float32), np.random.default_rng(0))


def test_size_indivisible_by_the_perm_grid_is_rejected_only_with_perm():
  image = np.zeros((30, 30, 3), np.float32)
  with pytest.raises(ValueError, match='30 x 30'):
    cutpaste.HardCutPaste(_config(perm_grid=4, p_perm=0.5))(
        image, np.random.default_rng(0))
  cutpaste.HardCutPaste(_config(perm_grid=4, p_perm=0.0))(
      image, np.random.default_rng(0))


# rotate.


def test_rotate_quarter_turns():
  image = np.arange(2 * 2 * 3).reshape(2, 2, 3)
  np.testing.assert_array_equal(cutpaste.rotate(image, 4), image)
  turned = cutpaste.rotate(image, 1)
  assert turned.shape == image.shape and turned.flags.c_contiguous
  np.testing.assert_array_equal(turned[0, 0], image[0, 1])  # (0, W-1) -> (0, 0)
  np.testing.assert_array_equal(turned[1, 0], image[0, 0])
  np.testing.assert_array_equal(cutpaste.rotate(turned, 3), image)
  grey = np.arange(6).reshape(2, 3)
  np.testing.assert_array_equal(cutpaste.rotate(grey, 2), grey[::-1, ::-1])


def test_rotate_odd_turns_of_a_non_square_image_raise():
  with pytest.raises(ValueError, match=r'\(2, 3\)'):
    cutpaste.rotate(np.zeros((2, 3)), 1)


# permute_pieces.


@pytest.mark.parametrize('grid', [2, 3])
def test_permute_pieces_is_a_non_identity_shuffle(grid):
  image = np.arange(6 * 6 * 3, dtype=np.float32).reshape(6, 6, 3)  # distinct pieces
  arrangements = set()
  for seed in range(300):
    out = cutpaste.permute_pieces(image, grid, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == image.dtype
    assert _pieces(out, grid) == _pieces(image, grid)
    assert not np.array_equal(out, image)
    arrangements.add(out.tobytes())
  if grid == 2:
    assert len(arrangements) == 23  # every one but the identity


def test_permute_pieces_rejects_indivisible_sizes_and_small_grids():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match='6 x 7'):
    cutpaste.permute_pieces(np.zeros((6, 7, 3)), 2, rng)
  with pytest.raises(ValueError, match='grid'):
    cutpaste.permute_pieces(np.zeros((6, 6, 3)), 1, rng)


# color_jitter.


def test_color_jitter_of_strength_zero_is_the_identity():
  image = _texture()
  out = cutpaste.color_jitter(image, 0.0, 0.0, 0.0, 0.0, np.random.default_rng(0))
  assert out.dtype == np.float32
  np.testing.assert_array_equal(_bits(out), _bits(image))


def test_brightness_jitter_scales_by_one_factor():
  image = _texture(0, 0.1, 0.6)  # 0.6 * 1.5 < 1: no clipping
  factors = []
  for seed in range(20):
    out = cutpaste.color_jitter(image, 0.5, 0.0, 0.0, 0.0,
                                np.random.default_rng(seed))
    ratio = out / image
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-6)
    factors.append(ratio.flat[0])
  assert 0.5 - 1e-6 <= min(factors) and max(factors) <= 1.5 + 1e-6
  assert max(factors) - min(factors) > 0.3  # really random


def test_contrast_jitter_blends_with_the_mean_grey_level():
  image = _texture(0, 0.3, 0.7)  # |f (x - m)| < 0.5: no clipping for f <= 1.2
  mean = float((image.astype(np.float64) @ [0.299, 0.587, 0.114]).mean())
  out = cutpaste.color_jitter(image, 0.0, 0.2, 0.0, 0.0, np.random.default_rng(1))
  ratio = (out - mean) / (image - mean)
  far = np.abs(image - mean) > 0.05  # away from the mean, where the ratio is stable
  np.testing.assert_allclose(ratio[far], np.median(ratio[far]), rtol=1e-4)
  assert 0.8 - 1e-4 <= np.median(ratio[far]) <= 1.2 + 1e-4


def test_saturation_and_hue_jitter_keep_grey_and_value():
  image = _texture(0, 0.2, 0.8)
  luma = np.array([0.299, 0.587, 0.114])
  out = cutpaste.color_jitter(image, 0.0, 0.0, 0.2, 0.0, np.random.default_rng(2))
  np.testing.assert_allclose(out @ luma, image @ luma, atol=1e-6)
  assert not np.allclose(out, image)
  out = cutpaste.color_jitter(image, 0.0, 0.0, 0.0, 0.1, np.random.default_rng(2))
  np.testing.assert_allclose(out.max(axis=-1), image.max(axis=-1), atol=1e-6)
  np.testing.assert_allclose(out.min(axis=-1), image.min(axis=-1), atol=1e-6)
  assert not np.allclose(out, image)


def test_greyscale_images_are_unchanged_by_saturation_and_hue_jitter():
  grey = np.repeat(_texture()[..., :1], 3, axis=-1)
  for seed in range(5):
    out = cutpaste.color_jitter(grey, 0.0, 0.0, 1.0, 0.5,
                                np.random.default_rng(seed))
    np.testing.assert_array_equal(out, grey)


def test_strong_color_jitter_stays_in_range():
  image = _texture()
  for seed in range(5):
    out = cutpaste.color_jitter(image, 1.0, 1.0, 1.0, 0.5,
                                np.random.default_rng(seed))
    assert out.dtype == np.float32 and out.shape == image.shape
    assert out.min() >= 0.0 and out.max() <= 1.0


@pytest.mark.parametrize('strengths', [(-0.1, 0.0, 0.0, 0.0), (0.0, -0.1, 0.0, 0.0),
                                       (0.0, 0.0, -0.1, 0.0), (0.0, 0.0, 0.0, 0.6)])
def test_color_jitter_rejects_invalid_strengths(strengths):
  with pytest.raises(ValueError):
    cutpaste.color_jitter(_texture(), *strengths, np.random.default_rng(0))


# CutPasteSampler.


def _run_config(rotations=(0,), flips=False) -> ml_collections.ConfigDict:
  config = mvtec.get_config()
  config.augment_by_category = ml_collections.ConfigDict()
  config.augment.rotations = rotations
  config.augment.hflip = flips
  config.augment.vflip = flips
  config.cutpaste = ml_collections.ConfigDict(DEFAULTS)
  return config


def test_sampler_without_augment_marks_exactly_the_changed_pixels():
  sampler = synthesis.CutPasteSampler(_run_config())
  non_empty = 0
  for seed in range(10):
    image = _texture(seed, -0.1, 1.1)
    sample = sampler(image, np.random.default_rng(seed))
    assert set(sample) == {'image', 'mask'}
    assert sample['image'].dtype == np.float32 and sample['mask'].dtype == np.float32
    assert sample['image'].shape == (SIZE, SIZE, 3)
    assert sample['mask'].shape == (SIZE, SIZE)
    changed = np.any(sample['image'] != np.clip(image, 0.0, 1.0), axis=-1)
    np.testing.assert_array_equal(sample['mask'], changed.astype(np.float32))
    non_empty += changed.any()
  assert 0 < non_empty < 10  # p_anomaly = 0.5


def test_sampler_synthesizes_on_the_geometrically_augmented_image():
  config = _run_config(rotations=(0, 90, 180, 270), flips=True)
  sampler = synthesis.CutPasteSampler(config)
  synthesize = synthesis.HardCutPaste(config.cutpaste)
  image = _texture()
  for seed in range(5):
    sample = sampler(image, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    augmented = synthesis.random_geometric(image, rng, config.augment.rotations,
                                           True, True)
    out, mask = synthesize(augmented, rng)
    np.testing.assert_array_equal(sample['image'], out)
    np.testing.assert_array_equal(sample['mask'], mask)
