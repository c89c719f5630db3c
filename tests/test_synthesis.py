"""Tests of the pseudo-anomaly synthesis (twostage_jax.synthesis)."""

import os

import ml_collections
import numpy as np
from PIL import Image
import pytest
from scipy import ndimage

from configs import mvtec
from twostage_jax import synthesis
from twostage_jax.synthesis import augment

SIZE = 64


def _config(**overrides) -> ml_collections.ConfigDict:
  config = mvtec.get_config().synthesis
  for key, value in overrides.items():
    config[key] = value
  return config


def _structured_image(seed: int = 0, size: int = SIZE) -> np.ndarray:
  """A uint8 RGB image with a narrow, uneven histogram and some noise."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  base = np.stack([60 + 60 * xx, 70 + 50 * yy, 90 + 40 * xx * yy], axis=-1)
  noisy = base + rng.normal(0.0, 4.0, base.shape)
  return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _normal_image(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).uniform(
      0.0, 1.0, (SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def builtin_sources() -> list[np.ndarray]:
  return synthesis.load_anomaly_sources('', SIZE)


@pytest.fixture(scope='module')
def store(builtin_sources) -> synthesis.SourceStore:
  config = _config()
  return synthesis.SourceStore.from_images(
      builtin_sources, config.saim_n_segments, config.saim_compactness, config.saim_sigma)


# Perlin noise and masks.


@pytest.mark.parametrize('shape,res', [((64, 64), (4, 8)),
                                       ((50, 70), (3, 4)),
                                       ((33, 17), (1, 1))])
def test_perlin_noise_range_and_lattice_zeros(shape, res):
  noise = synthesis.perlin_noise(shape, res, np.random.default_rng(0))
  assert noise.shape == shape and noise.dtype == np.float32
  assert np.abs(noise).max() <= 1.0 + 1e-6
  assert np.abs(noise).max() > 0.1
  cell_y = -(-shape[0] // res[0])
  cell_x = -(-shape[1] // res[1])
  np.testing.assert_array_equal(noise[::cell_y, ::cell_x], 0.0)
  assert np.count_nonzero(noise == 0.0) < noise.size // 10


def test_perlin_noise_frequency_follows_res():
  coarse = synthesis.perlin_noise((128, 128), (2, 2),
                                  np.random.default_rng(0))
  fine = synthesis.perlin_noise((128, 128), (32, 32),
                                np.random.default_rng(0))
  assert not np.array_equal(coarse, fine)
  roughness = lambda n: np.abs(np.diff(n, axis=1)).mean()
  assert roughness(fine) > 4 * roughness(coarse)


def test_perlin_noise_is_seeded():
  draw = lambda seed: synthesis.perlin_noise((32, 32), (4, 4),
                                             np.random.default_rng(seed))
  np.testing.assert_array_equal(draw(1), draw(1))
  assert not np.array_equal(draw(1), draw(2))


def test_perlin_mask_coverage():
  config = _config()
  masks = [synthesis.perlin_mask((SIZE, SIZE), np.random.default_rng(s),
                                 config) for s in range(60)]
  assert all(m.dtype == bool and m.shape == (SIZE, SIZE) for m in masks)
  coverage = np.array([m.mean() for m in masks])
  assert 0.02 < coverage.mean() < 0.15
  assert np.mean((coverage > 0) & (coverage < 1)) > 0.5
  assert coverage.max() < 0.6


def test_perlin_mask_grows_as_threshold_drops():
  high = synthesis.perlin_mask((SIZE, SIZE), np.random.default_rng(3),
                               _config(perlin_threshold=0.5))
  low = synthesis.perlin_mask((SIZE, SIZE), np.random.default_rng(3),
                              _config(perlin_threshold=0.1))
  assert np.all(low[high])
  assert low.sum() > high.sum()


def test_the_public_codes_perlin_mask_thresholds_unrotated_noise_at_a_drawn_level(monkeypatch):
  # A horizontal ramp from -1 to 1: a threshold t masks the columns above t,
  # (1 - t) / 2 of the image, identically in every row unless rotated.
  ramp = np.tile(np.linspace(-1.0, 1.0, SIZE, dtype=np.float32), (SIZE, 1))
  monkeypatch.setattr(synthesis.perlin, 'perlin_noise', lambda shape, res, rng: ramp)
  coverage = []
  for seed in range(50):
    mask = synthesis.perlin_mask((SIZE, SIZE), np.random.default_rng(seed),
                                 _config(recipe='tasad'))
    assert (mask == mask[:1]).all()
    coverage.append(mask.mean())
  # t ~ U(0, 1): coverage spreads over [0, 1/2].
  assert min(coverage) < 0.1 and max(coverage) > 0.4
  draem = [synthesis.perlin_mask((SIZE, SIZE), np.random.default_rng(seed), _config())
           for seed in range(10)]
  assert any((mask != mask[:1]).any() for mask in draem)  # rotated


def test_the_public_codes_perlin_masks_are_larger_and_sometimes_empty():
  coverage = {recipe: np.array([
      synthesis.perlin_mask((SIZE, SIZE), np.random.default_rng(s), _config(recipe=recipe)).mean()
      for s in range(300)]) for recipe in ('draem', 'tasad')}
  assert coverage['tasad'].mean() > 1.5 * coverage['draem'].mean()
  assert 0.1 < np.mean(coverage['tasad'] == 0) < 0.4


# Augmenters.


@pytest.mark.parametrize('augmenter', augment.AUGMENTERS,
                         ids=lambda f: f.__name__)
def test_augmenter_keeps_format_and_changes_image(augmenter):
  image = _structured_image()
  original = image.copy()
  changed = 0
  for seed in range(8):
    out = augmenter(image, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == np.uint8
    changed += not np.array_equal(out, image)
  np.testing.assert_array_equal(image, original)
  assert changed >= 1


def test_solarize_applies_to_half_of_the_images():
  image = _structured_image()
  applied = [not np.array_equal(augment.solarize(image,
                                                 np.random.default_rng(s)),
                                image) for s in range(200)]
  assert 0.35 < np.mean(applied) < 0.65


def test_gamma_is_drawn_per_channel():
  grey = np.full((8, 8, 3), 100, np.uint8)
  out = augment.gamma_contrast(grey, np.random.default_rng(0))
  assert len(set(out[0, 0].tolist())) == 3


def test_posterize_clears_low_bits():
  image = _structured_image()
  for seed in range(10):
    out = augment.posterize(image, np.random.default_rng(seed))
    assert any(np.array_equal(out, image & np.uint8((0xFF << k) & 0xFF))
               for k in range(8))


def test_hue_saturation_keeps_value():
  image = _structured_image()
  for seed in range(5):
    out = augment.hue_saturation(image, np.random.default_rng(seed))
    assert not np.array_equal(out, image)
    diff = out.max(-1).astype(int) - image.max(-1)
    assert np.abs(diff).max() <= 1


def test_invert_is_an_involution():
  image = _structured_image()
  rng = np.random.default_rng(0)
  np.testing.assert_array_equal(
      augment.invert(augment.invert(image, rng), rng), image)


def test_random_augment_applies_distinct_augmenters_in_drawn_order(
    monkeypatch):
  calls = []

  def recorder(index):
    def apply(image, rng):
      del rng
      calls.append(index)
      return image + 1
    return apply

  monkeypatch.setattr(augment, 'AUGMENTERS',
                      tuple(recorder(i) for i in range(10)))
  image = _structured_image() // 2
  out, labels = synthesis.random_augment(image, np.random.default_rng(5), 3)
  expected = np.random.default_rng(5).choice(10, size=3, replace=False)
  assert calls == expected.tolist()
  np.testing.assert_array_equal(out, image + 3)
  assert labels is None


def test_random_augment_draws_from_the_pool_it_is_given():
  calls = []

  def recorder(index):
    def apply(image, rng):
      del rng
      calls.append(index)
      return image
    return apply

  pool = tuple(recorder(i) for i in range(4))
  for seed in range(20):
    calls.clear()
    synthesis.random_augment(_structured_image(), np.random.default_rng(seed), 3, pool=pool)
    assert len(set(calls)) == 3
  with pytest.raises(ValueError, match='5 augmenters asked of a pool of 4'):
    synthesis.random_augment(_structured_image(), np.random.default_rng(0), 5, pool=pool)
  assert set(augment.POOLS['tasad']) == {augment.gamma_contrast, augment.brightness,
                                         augment.sharpness, augment.autocontrast}


@pytest.mark.parametrize('p_perlin', [1.0, 0.0], ids=['perlin', 'saim'])
def test_the_recipe_picks_the_augmenters_of_both_generators(store, monkeypatch, p_perlin):
  pools = []

  def recording(image, rng, num, labels=None, pool=None):
    del rng, num
    pools.append(pool)
    return image.copy(), labels

  monkeypatch.setattr(augment, 'random_augment', recording)
  for recipe in ('draem', 'tasad'):
    synth = synthesis.PseudoAnomalySynthesizer(
        store, _config(recipe=recipe, p_anomaly=1.0, p_perlin=p_perlin))
    for seed in range(3):
      synth(_normal_image(seed), np.random.default_rng(seed))
    assert pools and all(pool is augment.POOLS[recipe] for pool in pools)
    pools.clear()
  with pytest.raises(ValueError, match="exceeds the 4 augmenters of recipe 'tasad'"):
    synthesis.PseudoAnomalySynthesizer(store, _config(recipe='tasad', num_augmenters=5))


def test_random_augment_is_seeded_and_copies():
  image = _structured_image()
  a, _ = synthesis.random_augment(image, np.random.default_rng(7), 3)
  b, _ = synthesis.random_augment(image, np.random.default_rng(7), 3)
  np.testing.assert_array_equal(a, b)
  assert a.dtype == np.uint8 and a.shape == image.shape
  assert a.flags.writeable and not np.shares_memory(a, image)


def _block_labels(size: int = SIZE, block: int = 8) -> np.ndarray:
  return np.kron(np.arange((size // block) ** 2).reshape(size // block, -1),
                 np.ones((block, block), np.int64))


def test_labels_follow_the_rotation_and_ignore_colour_augmenters():
  labels = _block_labels()
  # Each block a distinct grey level: any pixel's value names its block.
  image = np.repeat((labels * 3 + 10).astype(np.uint8)[..., None], 3, axis=-1)
  for seed in range(8):
    # All ten augmenters: the rotation is always among them.
    texture, moved = synthesis.random_augment(
        image, np.random.default_rng(seed), 10, labels=labels)
    plain, unused = synthesis.random_augment(image, np.random.default_rng(seed), 10)
    np.testing.assert_array_equal(texture, plain)  # labels change no draw
    assert unused is None and moved.dtype == np.int32
    # The rotation alone, on the block image: nearest neighbour of the same
    # geometry gives back each pixel's block.
    rng = np.random.default_rng(seed)
    order = rng.choice(len(augment.AUGMENTERS), size=10, replace=False)
    angle = None
    for index in order:
      if augment.AUGMENTERS[index] is augment.rotate:
        angle = augment._rotation_angle(rng)
        break
      augment.AUGMENTERS[index](image, rng)
    turned = np.asarray(Image.fromarray(image[..., 0]).rotate(
        angle, resample=Image.Resampling.NEAREST))
    if abs(angle) > 5:
      assert (moved == augment.OUTSIDE).any()  # corners came in from outside
    inside = moved >= 0
    np.testing.assert_array_equal((turned[inside].astype(int) - 10) // 3, moved[inside])


# Anomaly sources.


def _write(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_sources_missing_folder(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match='nowhere'):
    synthesis.load_anomaly_sources(missing, SIZE)


def test_sources_folder_without_images(tmp_path):
  (tmp_path / 'notes.txt').write_text('not an image')
  with pytest.raises(ValueError, match='holds no images'):
    synthesis.load_anomaly_sources(str(tmp_path), SIZE)


def test_sources_corrupt_file_is_named(tmp_path):
  _write(str(tmp_path / 'good.png'), _structured_image())
  (tmp_path / 'broken.jpg').write_bytes(b'definitely not a jpeg')
  with pytest.raises(ValueError, match='broken.jpg'):
    synthesis.load_anomaly_sources(str(tmp_path), SIZE)


def test_sources_convert_and_resize_recursively_in_sorted_order(tmp_path):
  grey = np.full((30, 40), 77, np.uint8)
  rgba = np.zeros((50, 20, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[..., 3] = 10
  _write(str(tmp_path / 'b' / 'grey.png'), grey)
  _write(str(tmp_path / 'a' / 'rgba.PNG'), rgba)
  _write(str(tmp_path / 'c.bmp'), _structured_image(size=16))
  sources = synthesis.load_anomaly_sources(str(tmp_path), 24)
  assert len(sources) == 3
  for source in sources:
    assert source.shape == (24, 24, 3) and source.dtype == np.uint8
  np.testing.assert_array_equal(sources[0], [[[200, 0, 0]] * 24] * 24)
  np.testing.assert_array_equal(sources[1], 77)
  assert '3 anomaly source images' in synthesis.describe_sources(
      str(tmp_path))


def test_builtin_sources_are_deterministic(builtin_sources):
  again = synthesis.load_anomaly_sources('', SIZE)
  assert len(builtin_sources) >= 10
  assert len(again) == len(builtin_sources)
  for a, b in zip(builtin_sources, again):
    assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
  assert 'built-in' in synthesis.describe_sources('')


# Superpixels.


@pytest.mark.parametrize('fraction,expected', [(0.1, 10), (0.25, 25),
                                                (0.001, 1), (1.0, 100)])
def test_superpixel_mask_picks_whole_segments(fraction, expected):
  blocks = np.arange(100).reshape(10, 10) * 3 + 5  # non-contiguous ids
  labels = np.kron(blocks, np.ones((4, 4), np.int64))
  mask = synthesis.superpixel_mask(labels, np.random.default_rng(0), fraction)
  assert mask.dtype == bool and mask.shape == labels.shape
  picked = np.unique(labels[mask])
  assert len(picked) == expected
  np.testing.assert_array_equal(mask, np.isin(labels, picked))


def test_superpixel_mask_never_picks_pixels_outside_every_segment():
  labels = _block_labels()
  labels[:20] = augment.OUTSIDE
  for seed in range(20):
    mask = synthesis.superpixel_mask(labels, np.random.default_rng(seed), 0.5)
    assert mask.any() and not mask[:20].any()
  assert not synthesis.superpixel_mask(
      np.full((4, 4), augment.OUTSIDE), np.random.default_rng(0), 0.5).any()


def test_saim_candidate_is_a_union_of_whole_superpixels_of_the_pasted_texture():
  labels = _block_labels()
  colours = np.random.default_rng(0).integers(0, 256, size=(labels.max() + 1, 3))
  source = colours[labels].astype(np.uint8)
  config = _config(num_augmenters=10, saim_rotations=(90,), saim_fraction=0.2)
  inner = np.ones((5, 5), bool)
  for seed in range(6):
    candidate, texture, moved = synthesis.superpixel_paste(
        source, labels, np.random.default_rng(seed), config)
    assert candidate.any() and texture.shape == source.shape
    for label in np.unique(moved[moved >= 0]):
      region = moved == label
      # Whole regions only: every pixel of a region is in, or none is.
      assert candidate[region].all() or not candidate[region].any()
      # The regions follow the texture: away from the edges a region is one
      # colour of the augmented block it came from.
      core = ndimage.binary_erosion(region, inner)
      if core.sum() > 4:
        assert len(np.unique(texture[core].reshape(-1, 3), axis=0)) == 1
    assert not candidate[moved < 0].any()

# The synthesizer.


def _changed(out: np.ndarray, image: np.ndarray) -> np.ndarray:
  return (out != image).any(axis=-1)


def _check_sample(out, mask, image):
  assert out.dtype == np.float32 and out.shape == image.shape
  assert mask.dtype == np.float32 and mask.shape == image.shape[:2]
  assert out.min() >= 0.0 and out.max() <= 1.0
  assert set(np.unique(mask).tolist()) <= {0.0, 1.0}
  np.testing.assert_array_equal(mask.astype(bool), _changed(out, image))


@pytest.mark.parametrize('p_perlin', [1.0, 0.0], ids=['perlin', 'saim'])
def test_mask_is_exactly_the_changed_pixels(store, p_perlin):
  synth = synthesis.PseudoAnomalySynthesizer(
      store, _config(p_anomaly=1.0, p_perlin=p_perlin))
  nonempty = 0
  for seed in range(20):
    image = _normal_image(seed)
    out, mask = synth(image, np.random.default_rng(seed))
    _check_sample(out, mask, image)
    nonempty += mask.any()
  assert nonempty >= (10 if p_perlin else 20)


@pytest.mark.parametrize('p_perlin', [1.0, 0.0], ids=['perlin', 'saim'])
def test_pixels_equal_to_the_texture_are_not_anomalous(
    store, monkeypatch, p_perlin):
  texture = _structured_image(1)
  monkeypatch.setattr(augment, 'random_augment',
                      lambda image, rng, num, labels=None, pool=None: (texture.copy(), labels))
  synth = synthesis.PseudoAnomalySynthesizer(
      store,
      _config(p_anomaly=1.0, p_perlin=p_perlin, saim_rotations=(0,)))
  half = SIZE // 2
  reached_left = 0
  for seed in range(20):
    # Same seed, image unlike the texture: where the candidate mask lies.
    _, candidate = synth(_normal_image(seed), np.random.default_rng(seed))
    reached_left += candidate[:, :half].any()
    image = _normal_image(seed)
    image[:, :half] = texture[:, :half] / np.float32(255)
    out, mask = synth(image, np.random.default_rng(seed))
    _check_sample(out, mask, image)
    assert not mask[:, :half].any()
    np.testing.assert_array_equal(mask[:, half:], candidate[:, half:])
  assert reached_left >= 5


def test_perlin_blend_formula(store, monkeypatch):
  texture = np.full((SIZE, SIZE, 3), 200, np.uint8)
  monkeypatch.setattr(augment, 'random_augment',
                      lambda image, rng, num, labels=None, pool=None: (texture.copy(), labels))
  synth = synthesis.PseudoAnomalySynthesizer(
      store, _config(p_anomaly=1.0, p_perlin=1.0))
  checked = 0
  for seed in range(10):
    image = _normal_image(seed)
    out, mask = synth(image, np.random.default_rng(seed))
    inside = mask.astype(bool)
    if not inside.any():
      continue
    # x' - x = (1 - beta)(t - x) on the mask, with one beta per sample.
    ratio = (out - image)[inside] / (200 / 255 - image)[inside]
    assert 0.2 - 1e-4 <= ratio.mean() <= 1.0 + 1e-4
    np.testing.assert_allclose(ratio, ratio.mean(), atol=1e-3)
    checked += 1
  assert checked >= 5


def test_superpixel_paste_is_rotated_and_unblended(store,
                                                   monkeypatch):
  ramp = np.arange(SIZE, dtype=np.uint8)[None, :, None] * 3
  texture = np.broadcast_to(ramp, (SIZE, SIZE, 3)).copy()
  monkeypatch.setattr(augment, 'random_augment',
                      lambda image, rng, num, labels=None, pool=None: (texture.copy(), labels))
  synth = synthesis.PseudoAnomalySynthesizer(
      store,
      _config(p_anomaly=1.0, p_perlin=0.0, saim_rotations=(90,)))
  for seed in range(5):
    image = _normal_image(seed)
    out, mask = synth(image, np.random.default_rng(seed))
    inside = mask.astype(bool)
    assert inside.any()
    expected = np.rot90(texture).astype(np.float32) / 255
    np.testing.assert_array_equal(out[inside], expected[inside])
    np.testing.assert_array_equal(out[~inside], image[~inside])


def test_self_sources_replace_the_anomaly_sources_with_their_probability(store):
  # Self sources of two flat colours no anomaly source has; no augmenters,
  # so pasted or blended texture keeps them.
  flat = np.stack([np.full((SIZE, SIZE, 3), value, np.uint8) for value in (7, 249)])
  self_store = synthesis.SourceStore.from_images(list(flat), (30, 150, 250), 8.0, 1.0)
  for p_self, expected in ((1.0, 1.0), (0.5, 0.5), (0.0, 0.0)):
    synth = synthesis.PseudoAnomalySynthesizer(
        store, _config(p_anomaly=1.0, p_self_source=p_self, num_augmenters=0, beta_max=0.0,
                       saim_rotations=(0,)), self_sources=self_store)
    from_self = drawn = 0
    for seed in range(40):
      image = np.full((SIZE, SIZE, 3), 0.5, np.float32)
      out, mask = synth(image, np.random.default_rng(seed))
      if mask.any():
        drawn += 1
        # beta ~ U(0, 0): a Perlin blend takes the texture as it is.
        values = np.unique(np.rint(out[mask.astype(bool)] * 255))
        from_self += set(values.tolist()) <= {7.0, 249.0}
    assert drawn >= 30
    assert abs(from_self / drawn - expected) <= 0.2
  with pytest.raises(ValueError, match='p_self_source > 0 needs'):
    synthesis.PseudoAnomalySynthesizer(store, _config(p_self_source=0.5))


def test_no_anomaly_returns_the_image(store):
  synth = synthesis.PseudoAnomalySynthesizer(
      store, _config(p_anomaly=0.0))
  for seed in range(10):
    image = _normal_image(seed)
    out, mask = synth(image, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, image)
    assert not mask.any()


def test_mixed_stream(store):
  synth = synthesis.PseudoAnomalySynthesizer(store, _config())
  rng = np.random.default_rng(0)
  empty = 0
  for seed in range(60):
    image = _normal_image(seed)
    out, mask = synth(image, rng)
    _check_sample(out, mask, image)
    if not mask.any():
      empty += 1
      np.testing.assert_array_equal(out, image)
  assert 20 <= empty <= 50


def test_samples_are_seeded(store):
  synth = synthesis.PseudoAnomalySynthesizer(
      store, _config(p_anomaly=1.0))
  image = _normal_image(0)
  draw = lambda seed: synth(image, np.random.default_rng(seed))
  for seed in range(4):
    (a, ma), (b, mb) = draw(seed), draw(seed)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)
  samples = [draw(seed)[0] for seed in range(4)]
  assert all(not np.array_equal(samples[i], samples[j])
             for i in range(4) for j in range(i + 1, 4))


def test_synthesizer_rejects_mismatched_inputs(store):
  synth = synthesis.PseudoAnomalySynthesizer(store, _config())
  with pytest.raises(ValueError, match='does not match'):
    synth(np.zeros((SIZE + 1, SIZE, 3), np.float32),
          np.random.default_rng(0))
  with pytest.raises(ValueError, match='no SLIC labels for saim_n_segments \\[40\\]'):
    synthesis.PseudoAnomalySynthesizer(store, _config(saim_n_segments=(30, 40)))
  with pytest.raises(ValueError, match='square'):
    synthesis.SourceStore(np.zeros((2, SIZE, SIZE + 2, 3), np.uint8), {})
  with pytest.raises(ValueError, match=r'uint8 \(N, S, S, 3\)'):
    synthesis.SourceStore(np.zeros((2, SIZE, SIZE, 3), np.float32), {})
  with pytest.raises(ValueError, match='n_segments=30 have shape'):
    synthesis.SourceStore(np.zeros((2, SIZE, SIZE, 3), np.uint8),
                          {30: np.zeros((2, SIZE, SIZE - 1), np.uint16)})
