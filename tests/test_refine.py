"""Stage-2 refinement against SciPy/NumPy references and hand-built cases."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.ndimage

from configs import mvtec
from twostage_jax.data import demo
from twostage_jax.methods.two_stage import device_slic
from twostage_jax.methods.two_stage import refine
from twostage_jax.synthesis import superpixel

import compile_speed  # tests/compile_speed.py


def refine_config(**overrides):
  config = mvtec.get_config().refine
  config.update(overrides)
  return config


def reference_region(maps, labels, config):
  """The refinement written plainly: SciPy median, a loop over superpixels."""
  out = np.zeros(maps.shape, bool)
  for i, (m, lab) in enumerate(zip(maps, labels)):
    limit = config.threshold * (m.max() if config.threshold_rule == 'relative' else 1.0)
    flags = scipy.ndimage.median_filter((m >= limit).astype(np.uint8), config.median_size,
                                        mode='nearest').astype(bool)
    for segment in np.unique(lab):
      if flags[lab == segment].any():
        out[i][lab == segment] = True
  return out


@pytest.mark.parametrize('size', [3, 5])
def test_binary_median_equals_scipy_median_with_replicated_edges(size):
  flags = np.random.default_rng(size).random((3, 17, 23)) < 0.4
  expected = scipy.ndimage.median_filter(flags.astype(np.uint8), size=(1, size, size),
                                         mode='nearest')
  np.testing.assert_array_equal(refine.binary_median(jnp.asarray(flags), size), expected == 1)


@pytest.mark.parametrize('rule', ['absolute', 'relative'])
def test_region_equals_the_plain_reference(rule):
  rng = np.random.default_rng(0)
  maps = scipy.ndimage.gaussian_filter(rng.random((4, 32, 32)), (0, 2, 2)) * 2 - 0.4
  blocks = rng.permutation(64).reshape(8, 8)  # 64 square superpixels, shuffled ids
  labels = np.stack([np.kron(np.roll(blocks, i), np.ones((4, 4), int)) for i in range(4)])
  config = refine_config(threshold_rule=rule, threshold=0.6)
  got = refine.region(jnp.asarray(maps, jnp.float32), jnp.asarray(labels, jnp.int32), config)
  expected = reference_region(maps.astype(np.float32), labels, config)
  assert 0 < expected.sum() < expected.size  # a case where the selection matters
  np.testing.assert_array_equal(got, expected)


def public_code_region(maps, labels, th_pix, th_val):
  """The public TASAD code's seg_module, channel layout fixed, maps within [-1, 1]."""
  out = np.zeros(maps.shape, bool)
  for i, (m, lab) in enumerate(zip(maps, labels)):
    levels = np.array(np.abs(m) * 255, dtype=np.uint8)
    values, counts = np.unique(levels, return_counts=True)
    rare = values[counts <= th_pix * counts.max()]
    kept = levels * np.isin(levels, rare[rare > 0])
    median = scipy.ndimage.median_filter(kept, size=3)
    out[i] = np.isin(lab, np.unique(lab[median > th_val]))
  return out


@pytest.mark.parametrize('th_pix, th_val', [(0.95, 30), (1.0, 0), (0.5, 60)])
def test_tasad_rule_equals_the_public_code(th_pix, th_val):
  rng = np.random.default_rng(1)
  # A background level shared by most pixels (which th_pix < 1 drops even
  # though it lies above th_val), smooth blobs, some negative values.
  blobs = scipy.ndimage.gaussian_filter(rng.random((4, 32, 32)), (0, 2, 2))
  maps = np.where(blobs > 0.55, blobs, 0.2)
  maps[1, :4] = -0.6
  maps[2] = np.where(maps[2] == 0.2, 0.0, maps[2])  # a clean background
  maps = maps.astype(np.float32)
  blocks = rng.permutation(64).reshape(8, 8)
  labels = np.stack([np.kron(np.roll(blocks, i), np.ones((4, 4), int)) for i in range(4)])
  config = refine_config(threshold_rule='tasad', tasad_th_pix=th_pix, tasad_th_val=th_val)
  got = refine.region(jnp.asarray(maps), jnp.asarray(labels, jnp.int32), config)
  expected = public_code_region(maps, labels, th_pix, th_val)
  assert 0 < expected.sum() < expected.size
  np.testing.assert_array_equal(got, expected)


def test_tasad_rule_drops_the_background_level_and_saturates_above_one():
  maps = np.full((1, 16, 16), 0.2, np.float32)  # level 51, above th_val 30
  maps[0, 4:8, 4:8] = 1.3  # level 331: saturates to 255, not the uint8 wrap to 75
  flags = np.asarray(refine.tasad_flags(jnp.asarray(maps), 0.95, 100))
  np.testing.assert_array_equal(flags[0], maps[0] > 1)
  absolute = np.asarray(refine.threshold(
      jnp.asarray(maps), refine_config(threshold_rule='absolute', threshold=0.12)))
  assert absolute.all()  # an absolute cut at the same level keeps the background


def test_isolated_pixel_is_dropped_and_a_blob_selects_every_superpixel_it_touches():
  labels = np.kron(np.arange(16).reshape(4, 4), np.ones((8, 8), int))[None]  # 8x8 tiles
  maps = np.zeros((1, 32, 32), np.float32)
  maps[0, 3, 28] = 1.0  # one stray pixel in tile 3
  maps[0, 14:18, 14:18] = 1.0  # a 4x4 blob on the corner of tiles 5, 6, 9, 10
  selected = np.asarray(refine.region(jnp.asarray(maps), jnp.asarray(labels, jnp.int32),
                                      refine_config(threshold_rule='absolute')))
  expected = np.isin(labels, [5, 6, 9, 10])
  np.testing.assert_array_equal(selected, expected)


def test_nothing_flagged_gives_an_all_zero_stage2_input():
  images = jnp.ones((2, 8, 8, 3))
  labels = jnp.zeros((2, 8, 8), jnp.int32)
  selected = refine.region(jnp.full((2, 8, 8), 0.2), labels,
                           refine_config(threshold_rule='absolute'))
  assert not np.asarray(selected).any()
  assert not np.asarray(refine.masked_input(images, selected)).any()


def test_masked_input_keeps_the_image_inside_the_region_only():
  images = jax.random.uniform(jax.random.key(0), (1, 6, 6, 3))
  selected = jnp.zeros((1, 6, 6), bool).at[0, 1:3, 2:5].set(True)
  out = np.array(refine.masked_input(images, selected))
  np.testing.assert_array_equal(out[0, 1:3, 2:5], np.asarray(images)[0, 1:3, 2:5])
  out[0, 1:3, 2:5] = 0
  assert not out.any()


@pytest.mark.parametrize('rule,expected', [('sum', [1.0, 0.5]), ('mean', [0.5, 0.25]),
                                           ('max', [0.75, 0.5]), ('stage2', [0.25, 0.5])])
def test_combine_rules(rule, expected):
  stage1, stage2 = jnp.array([0.75, 0.0]), jnp.array([0.25, 0.5])
  np.testing.assert_allclose(refine.combine(stage1, stage2, rule), expected)


def test_unknown_rules_are_named():
  with pytest.raises(ValueError, match="unknown refine.combine 'product'"):
    refine.combine(jnp.zeros(2), jnp.zeros(2), 'product')
  with pytest.raises(ValueError, match="unknown refine.threshold_rule 'otsu'"):
    refine.threshold(jnp.zeros((1, 2, 2)), refine_config(threshold_rule='otsu'))


def test_stage2_batch_uses_frozen_stage1_and_keeps_the_target():
  """A stand-in stage 1 that flags bright pixels; no gradient reaches its variables."""
  def stage1_apply(variables, images, train):
    assert train is False  # inference mode: BatchNorm running statistics
    return images.mean(-1) * variables['gain']

  images = jnp.zeros((1, 16, 16, 3)).at[0, 4:8, 4:8].set(1.0).at[0, 12:, 12:].set(0.3)
  labels = jnp.asarray(np.kron(np.arange(4).reshape(2, 2), np.ones((8, 8), int))[None],
                       jnp.int32)
  batch = {'image': images, 'mask': jnp.ones((1, 16, 16)), 'labels': labels}
  config = ml_collections.ConfigDict(refine_config(threshold_rule='absolute'))

  out = refine.stage2_batch(stage1_apply, {'gain': 1.0}, batch, config)
  expected = np.zeros((1, 16, 16, 3), np.float32)
  expected[0, :8, :8] = np.asarray(images)[0, :8, :8]  # only tile 0 holds the bright blob
  np.testing.assert_array_equal(out['image'], expected)
  np.testing.assert_array_equal(out['mask'], batch['mask'])
  grad = jax.grad(lambda v: refine.stage2_batch(stage1_apply, v, batch, config)['image'].sum())(
      {'gain': 1.0})
  assert grad['gain'] == 0.0


@pytest.mark.parametrize('train_rule,kept', [('test', False), ('tasad', True)])
def test_training_rule_decides_whether_a_weak_stage1_map_keeps_the_anomaly(train_rule, kept):
  """A map at 8-bit level 12 on one tile: below th_val 30, above the training rule's 0."""
  def stage1_apply(variables, images, train):
    del variables, train
    return images.mean(-1)

  images = jnp.zeros((1, 16, 16, 3)).at[0, 2:6, 2:6].set(0.05)
  labels = jnp.asarray(np.kron(np.arange(4).reshape(2, 2), np.ones((8, 8), int))[None],
                       jnp.int32)
  batch = {'image': images, 'mask': jnp.ones((1, 16, 16)), 'labels': labels}
  config = ml_collections.ConfigDict(refine_config(train_rule=train_rule))
  out = np.asarray(refine.stage2_batch(stage1_apply, {}, batch, config)['image'])
  np.testing.assert_array_equal(out[0, :8, :8], np.asarray(images)[0, :8, :8] * kept)
  assert not out[0, 8:].any() and not out[0, :, 8:].any()
  # At test time the region always follows the test rule: nothing flagged here.
  assert not np.asarray(refine.region(images.mean(-1), labels, config)).any()


def test_unknown_training_rule_is_named():
  with pytest.raises(ValueError, match="unknown refine.train_rule 'all'"):
    refine.training_rule(refine_config(train_rule='all'))


def test_device_and_host_superpixels_select_the_same_regions():
  # Stage 1 flags a defect's pixels (the exact mask as its map); the region
  # the refinement keeps is the union of the superpixels they touch.
  config = refine_config(threshold_rule='absolute', threshold=0.5)
  images, maps = [], []
  for index, (category, defect) in enumerate([('weave', 'scratch'), ('weave', 'hole'),
                                              ('weave', 'stain'), ('washer', 'missing'),
                                              ('washer', 'foreign'), ('washer', 'scratch')]):
    _, defective, mask = demo.render_defective(category, defect, np.random.default_rng(index),
                                               128)
    images.append(defective)
    maps.append(mask.astype(np.float32))
  images, maps = np.stack(images), np.stack(maps)
  slic = (config.n_segments, config.compactness, config.sigma)
  host = np.stack([superpixel.slic_labels(image, *slic) for image in images])
  # 6 images of 128 x 128: compiled as users' are, to run fast.
  device = compile_speed.at_xla_defaults(device_slic.slic_labels, images, *slic)(images)
  selected_host = np.asarray(refine.region(maps, host, config))
  selected_device = np.asarray(refine.region(maps, device, config))
  assert selected_host.any(axis=(1, 2)).all()
  iou = [(h & d).sum() / (h | d).sum() for h, d in zip(selected_host, selected_device)]
  assert np.mean(iou) >= 0.9, iou
