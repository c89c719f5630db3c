"""Tests of Bauer's patch distortion and the geometric augmentation."""

import ml_collections
import numpy as np
import pytest
from skimage import data
from skimage import transform

from twostage_jax import synthesis

SIZE = 64


def _config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      'p_distort': 1.0,
      'patch_min_fraction': 0.1,
      'patch_max_fraction': 0.5,
      'elastic_alpha': 4.0,
      'elastic_sigma': 2.0,
      'shape_sigma': 0.1,
      'shape_threshold': 0.5,
      'brightness_max': 0.1,
  })
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def astronaut() -> np.ndarray:
  image = transform.resize(data.astronaut(), (SIZE, SIZE), anti_aliasing=True)
  return image.astype(np.float32)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
  """(top, bottom, left, right), bottom and right exclusive."""
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


# PatchDistorter.


@pytest.mark.parametrize('seed', range(5))
def test_mask_is_exactly_the_changed_pixels(astronaut, seed):
  out, mask = synthesis.PatchDistorter(_config())(
      astronaut, np.random.default_rng(seed))
  assert out.dtype == np.float32 and mask.dtype == np.float32
  assert out.shape == astronaut.shape and mask.shape == (SIZE, SIZE)
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert set(np.unique(mask)) <= {0.0, 1.0}
  changed = np.any(out != astronaut, axis=-1)
  np.testing.assert_array_equal(mask, changed.astype(np.float32))
  assert changed.any()


@pytest.mark.parametrize('seed', range(5))
def test_pixels_outside_the_patch_are_bit_identical(astronaut, seed):
  # The patch box is redrawn from a generator in the same state: the
  # p_distort draw comes first, then the box.
  distorter = synthesis.PatchDistorter(_config(shape_threshold=0.0))
  out, mask = distorter(astronaut, np.random.default_rng(seed))
  rng = np.random.default_rng(seed)
  rng.random()
  top, left, height, width = distorter._patch_box(SIZE, SIZE, rng)
  assert _bbox(mask) == (top, top + height, left, left + width)
  outside = np.ones((SIZE, SIZE), bool)
  outside[top:top + height, left:left + width] = False
  np.testing.assert_array_equal(out[outside].view(np.uint32),
                                astronaut[outside].view(np.uint32))


def test_same_seed_same_output_different_seeds_differ(astronaut):
  distorter = synthesis.PatchDistorter(_config())
  draw = lambda seed: distorter(astronaut, np.random.default_rng(seed))
  out_a, mask_a = draw(3)
  out_b, mask_b = draw(3)
  np.testing.assert_array_equal(out_a, out_b)
  np.testing.assert_array_equal(mask_a, mask_b)
  out_c, mask_c = draw(4)
  assert not np.array_equal(out_a, out_c)
  assert not np.array_equal(mask_a, mask_c)


def test_p_distort_zero_leaves_the_image(astronaut):
  distorter = synthesis.PatchDistorter(_config(p_distort=0.0))
  for seed in range(5):
    out, mask = distorter(astronaut, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, astronaut)
    assert not mask.any()


def test_p_distort_one_always_distorts(astronaut):
  distorter = synthesis.PatchDistorter(_config(brightness_max=0.0))
  for seed in range(20):
    out, mask = distorter(astronaut, np.random.default_rng(seed))
    assert mask.any(), seed
    assert not np.array_equal(out, astronaut)


def test_p_distort_is_a_probability(astronaut):
  distorter = synthesis.PatchDistorter(_config(p_distort=0.5))
  hits = sum(distorter(astronaut, np.random.default_rng(seed))[1].any()
             for seed in range(200))
  assert 70 < hits < 130


def test_no_deformation_no_brightness_changes_nothing(astronaut):
  """A drawn patch without warp or brightness change equals the input.

  The mask holds only changed pixels, so it is empty although a patch and a
  shape were drawn (p_distort = 1).
  """
  distorter = synthesis.PatchDistorter(
      _config(elastic_alpha=0.0, brightness_max=0.0))
  for seed in range(5):
    out, mask = distorter(astronaut, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, astronaut)
    assert not mask.any()


def test_brightness_alone_changes_pixels(astronaut):
  distorter = synthesis.PatchDistorter(
      _config(elastic_alpha=0.0, brightness_max=0.5))
  out, mask = distorter(astronaut, np.random.default_rng(1))
  assert mask.any()
  changed = mask.astype(bool)
  ratio = out[changed].sum() / astronaut[changed].sum()
  assert ratio != pytest.approx(1.0, abs=1e-3)


def test_out_of_range_input_is_clipped():
  image = np.random.default_rng(0).uniform(-0.5, 1.5, (SIZE, SIZE, 3))
  out, mask = synthesis.PatchDistorter(_config())(
      image.astype(np.float32), np.random.default_rng(0))
  assert out.min() >= 0.0 and out.max() <= 1.0
  clipped = np.clip(image, 0.0, 1.0).astype(np.float32)
  np.testing.assert_array_equal(
      mask, np.any(out != clipped, axis=-1).astype(np.float32))


def test_patch_size_respects_the_fraction_bounds(astronaut):
  config = _config(patch_min_fraction=0.1, patch_max_fraction=0.3)
  distorter = synthesis.PatchDistorter(config)
  for seed in range(40):
    _, mask = distorter(astronaut, np.random.default_rng(seed))
    top, bottom, left, right = _bbox(mask)
    assert bottom - top <= round(0.3 * SIZE)
    assert right - left <= round(0.3 * SIZE)


def test_patch_height_and_width_follow_the_image_sides():
  image = transform.resize(data.astronaut(), (48, 80), anti_aliasing=True)
  distorter = synthesis.PatchDistorter(_config(
      patch_min_fraction=0.25, patch_max_fraction=0.25, shape_threshold=0.0))
  heights, widths = [], []
  for seed in range(10):
    _, mask = distorter(image.astype(np.float32), np.random.default_rng(seed))
    top, bottom, left, right = _bbox(mask)
    heights.append(bottom - top)
    widths.append(right - left)
  assert max(heights) == 12 and max(widths) == 20


@pytest.mark.parametrize('field,value', [
    ('patch_min_fraction', 0.0),
    ('patch_max_fraction', 1.5),
    ('patch_min_fraction', 0.6),  # above patch_max_fraction = 0.5
    ('elastic_alpha', -1.0),
    ('elastic_sigma', -0.5),
    ('shape_sigma', float('nan')),
    ('shape_threshold', 1.0),
    ('brightness_max', -0.1),
    ('p_distort', 1.2),
])
def test_bad_config_raises(field, value):
  with pytest.raises(ValueError, match=field):
    synthesis.PatchDistorter(_config(**{field: value}))


def test_rejects_non_rgb_image():
  with pytest.raises(ValueError):
    synthesis.PatchDistorter(_config())(np.zeros((8, 8), np.float32),
                                        np.random.default_rng(0))


# random_geometric.


def _ramp(shape: tuple[int, ...]) -> np.ndarray:
  return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def test_rotation_follows_np_rot90():
  image = _ramp((8, 8, 3))
  out = synthesis.random_geometric(image, np.random.default_rng(0), (90,),
                                   hflip=False, vflip=False)
  np.testing.assert_array_equal(out, np.rot90(image))
  # Counter-clockwise as displayed: the top-right corner goes to top-left.
  np.testing.assert_array_equal(out[0, 0], image[0, -1])
  assert out.flags.c_contiguous


def test_rotation_and_flip_draws():
  image = _ramp((6, 6))
  seen = set()
  for seed in range(40):
    out = synthesis.random_geometric(image, np.random.default_rng(seed), (0,),
                                     hflip=True, vflip=False)
    if np.array_equal(out, image):
      seen.add('identity')
    elif np.array_equal(out, image[:, ::-1]):
      seen.add('hflip')
    else:
      pytest.fail('neither the image nor its mirror')
  assert seen == {'identity', 'hflip'}
  vflipped = [synthesis.random_geometric(
      image, np.random.default_rng(seed), (0,), hflip=False, vflip=True)
              for seed in range(40)]
  assert any(np.array_equal(out, image[::-1]) for out in vflipped)
  assert all(np.array_equal(out, image) or np.array_equal(out, image[::-1])
             for out in vflipped)
  angles = {next(k for k in range(4) if np.array_equal(out, np.rot90(image, k)))
            for out in (synthesis.random_geometric(
                image, np.random.default_rng(seed), (0, 90, 180, 270),
                hflip=False, vflip=False) for seed in range(40))}
  assert angles == {0, 1, 2, 3}


def test_non_square_rotation_and_bad_angles_raise():
  image = _ramp((4, 6, 3))
  with pytest.raises(ValueError, match='square'):
    synthesis.random_geometric(image, np.random.default_rng(0), (0, 90),
                               hflip=False, vflip=False)
  out = synthesis.random_geometric(image, np.random.default_rng(0), (180,),
                                   hflip=False, vflip=False)
  np.testing.assert_array_equal(out, image[::-1, ::-1])
  with pytest.raises(ValueError, match='multiples of 90'):
    synthesis.random_geometric(_ramp((4, 4)), np.random.default_rng(0),
                               (45,), hflip=False, vflip=False)
  with pytest.raises(ValueError):
    synthesis.random_geometric(_ramp((4, 4)), np.random.default_rng(0), (),
                               hflip=False, vflip=False)


def test_image_and_mask_stay_aligned():
  image = np.random.default_rng(0).uniform(size=(16, 16, 3)).astype(
      np.float32)
  mask = (image[..., 0] > 0.5).astype(np.float32)
  args = ((0, 90, 180, 270), True, True)
  for seed in range(10):
    out_image = synthesis.random_geometric(
        image, np.random.default_rng(seed), *args)
    out_mask = synthesis.random_geometric(
        mask, np.random.default_rng(seed), *args)
    assert out_mask.shape == (16, 16) and out_mask.dtype == np.float32
    np.testing.assert_array_equal(
        out_mask, (out_image[..., 0] > 0.5).astype(np.float32))


def test_returns_a_new_array():
  image = _ramp((4, 4))
  out = synthesis.random_geometric(image, np.random.default_rng(0), (0,),
                                   hflip=False, vflip=False)
  out[0, 0] = -1.0
  assert image[0, 0] == 0.0
