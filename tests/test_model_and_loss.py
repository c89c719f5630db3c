"""The segmentation network's shape and size, and the SSIM + L2 objective."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from configs import mvtec
from twostage_jax import losses
from twostage_jax.models import SegmentationNet


def count_params(width, image_size=256):
  model = SegmentationNet(width, 0.9, 1e-5, axis_name=None)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(variables['params']))


def test_parameter_count_at_paper_width():
  # Hand count, w = 128: bias-free 3x3 convs 3->w->w, w->2w->2w, 2w->4w->4w,
  # 4w->4w->4w->2w, 2w->2w->2w->w; 12 BatchNorms (scale + bias); final conv
  # w->1 with bias.
  w = 128
  convs = [(3, w), (w, w), (w, 2 * w), (2 * w, 2 * w), (2 * w, 4 * w), (4 * w, 4 * w),
           (4 * w, 4 * w), (4 * w, 4 * w), (4 * w, 2 * w),
           (2 * w, 2 * w), (2 * w, 2 * w), (2 * w, w)]
  expected = sum(9 * i * o + 2 * o for i, o in convs) + 9 * w + 1
  assert expected == 11_955_969
  assert count_params(128) == expected


def test_output_is_one_map_per_image_at_input_size():
  model = SegmentationNet(4, 0.9, 1e-5, axis_name=None)
  x = jnp.ones((2, 32, 48, 3))
  variables = model.init(jax.random.key(0, impl='rbg'), x, train=False)
  assert model.apply(variables, x, train=False).shape == (2, 32, 48)
  with pytest.raises(ValueError, match=r'multiples of 4 .*got 30x48'):
    model.apply(variables, jnp.ones((2, 30, 48, 3)), train=False)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ssim_matches_scikit_image_gaussian_ssim(seed):
  config = mvtec.get_config().loss
  rng = np.random.default_rng(seed)
  a = rng.random((37, 52)).astype(np.float32)
  b = np.clip(a + 0.25 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  mean, full = structural_similarity(
      a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
      data_range=1.0, full=True)
  ours = np.asarray(losses.ssim_map(jnp.asarray(a), jnp.asarray(b), config))
  # scikit-image pads by reflection and averages without a 5-pixel border;
  # we pad with zeros (as the papers' code): the maps agree inside the border.
  inner = (slice(5, -5), slice(5, -5))
  np.testing.assert_allclose(ours[inner], full[inner], atol=1e-4)
  assert abs(ours[inner].mean() - mean) < 1e-4
  # At the border zero padding does differ, so the convention is observable.
  assert np.abs(ours[0] - full[0]).max() > 1e-3


def test_ssim_l2_loss_is_zero_for_identical_maps_and_grows_with_perturbation():
  config = mvtec.get_config().loss
  rng = np.random.default_rng(0)
  mask = np.zeros((2, 32, 32), np.float32)
  mask[0, 8:20, 10:24] = 1.0
  target = jnp.asarray(mask)
  loss0, terms0 = losses.ssim_l2_loss(target, target, config)
  assert float(loss0) == pytest.approx(0.0, abs=1e-6)
  assert float(terms0['ssim']) == pytest.approx(1.0, abs=1e-6)
  noise = jnp.asarray(rng.standard_normal(mask.shape).astype(np.float32))
  previous = float(loss0)
  for scale in (0.01, 0.1, 0.5):
    loss, terms = losses.ssim_l2_loss(target + scale * noise, target, config)
    assert float(loss) > previous
    assert float(terms['l2']) == pytest.approx(float(jnp.mean((scale * noise) ** 2)), rel=1e-5)
    previous = float(loss)


def test_ssim_l2_loss_weights_come_from_the_config():
  config = mvtec.get_config().loss
  target = jnp.zeros((1, 16, 16))
  prediction = target + 0.3
  _, terms = losses.ssim_l2_loss(prediction, target, config)
  config.ssim_weight, config.l2_weight = 0.0, 2.0
  loss, _ = losses.ssim_l2_loss(prediction, target, config)
  assert float(loss) == pytest.approx(2.0 * float(terms['l2']), rel=1e-6)
