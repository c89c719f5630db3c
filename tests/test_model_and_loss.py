"""The segmentation network's shape and size, and the SSIM + L2 objective."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import structural_similarity

from configs import mvtec
from layer_dtypes import conv_output_dtypes, float64_output_dtypes  # tests/layer_dtypes.py
from twostage_jax import losses
from twostage_jax.methods.two_stage.model import SegmentationNet
from twostage_jax.models import layers


def count_params(width, image_size=256, dtype=jnp.float32):
  model = SegmentationNet(width, 0.9, 1e-5, axis_name=None, dtype=dtype)
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
  assert count_params(128, dtype=jnp.bfloat16) == expected


def test_output_is_one_map_per_image_at_input_size():
  model = SegmentationNet(4, 0.9, 1e-5, axis_name=None)
  x = jnp.ones((2, 32, 48, 3))
  # Traced only: shapes are all that is checked.
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0, impl='rbg'), x, train=False))
  apply = lambda y: jax.eval_shape(lambda v: model.apply(v, y, train=False), variables)
  assert apply(x).shape == (2, 32, 48)
  with pytest.raises(ValueError, match=r'multiples of 4 .*got 30x48'):
    apply(jnp.ones((2, 30, 48, 3)))


def test_normal_init_draws_kernels_and_scales_with_the_given_spread():
  x = jnp.zeros((1, 16, 16, 3))
  variables = {
      init: SegmentationNet(8, 0.9, 1e-5, axis_name=None, weight_init=init,
                            weight_init_std=0.02).init(jax.random.key(0), x, train=False)
      for init in ('lecun', 'normal')}
  flat = {init: jax.tree_util.tree_flatten_with_path(v['params'])[0]
          for init, v in variables.items()}

  def pooled(init, name):
    return np.concatenate([np.ravel(leaf) for path, leaf in flat[init]
                           if path[-1].key == name])

  kernels, scales = pooled('normal', 'kernel'), pooled('normal', 'scale')
  # n draws: the sample mean's standard error is std / sqrt(n), the sample
  # standard deviation's about std / sqrt(2n); 6 standard errors.
  for values, mean in ((kernels, 0.0), (scales, 1.0)):
    n = values.size
    assert abs(values.mean() - mean) < 6 * 0.02 / np.sqrt(n)
    assert abs(values.std() - 0.02) < 6 * 0.02 / np.sqrt(2 * n)
  np.testing.assert_array_equal(pooled('lecun', 'scale'), 1.0)
  # LeCun: each layer's std is 1/sqrt(fan_in) >= 1/sqrt(9 * 32) = 0.059.
  assert pooled('lecun', 'kernel').std() > 2 * 0.02
  with pytest.raises(ValueError, match="'normal' needs a positive init_std"):
    SegmentationNet(8, 0.9, 1e-5, axis_name=None, weight_init='normal').init(
        jax.random.key(0), x, train=False)


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


def test_ssim_pads_its_window_with_zeros_as_the_papers_code():
  """The SSIM loss keeps the papers' zero-padded window (unlike the maps' smoothing)."""
  config = mvtec.get_config().loss
  rng = np.random.default_rng(3)
  a = rng.random((29, 31))
  b = np.clip(a + 0.25 * rng.standard_normal(a.shape), 0, 1)
  offsets = np.arange(config.ssim_window) - config.ssim_window // 2
  taps = np.exp(-0.5 * (offsets / config.ssim_sigma) ** 2)
  taps /= taps.sum()

  def mean(x):
    return ndimage.correlate1d(ndimage.correlate1d(x, taps, 0, mode='constant'), taps, 1,
                               mode='constant')

  c1, c2 = config.ssim_k1 ** 2, config.ssim_k2 ** 2
  mu_a, mu_b = mean(a), mean(b)
  var_a, var_b = mean(a * a) - mu_a ** 2, mean(b * b) - mu_b ** 2
  covariance = mean(a * b) - mu_a * mu_b
  expected = ((2 * mu_a * mu_b + c1) * (2 * covariance + c2)
              / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  ours = losses.ssim_map(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), config)
  # float32 window means of 121 values in [0, 1] round by at most 121 x 2^-24
  # (7e-6); divided by variances of about 0.1: 1e-4 covers the worst case.
  # Reflected padding would differ by up to 0.58 at the border.
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4)


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


def random_normal(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def test_max_pool_2x2_equals_flax_max_pool_with_its_gradient():
  # Continuous random values: no window has two equal maxima.
  x = random_normal((2, 8, 12, 5))
  cotangent = random_normal((2, 4, 6, 5), seed=1)
  ours, ours_vjp = jax.vjp(layers.max_pool_2x2, x)
  flax_pool = lambda y: nn.max_pool(y, (2, 2), strides=(2, 2))
  theirs, theirs_vjp = jax.vjp(flax_pool, x)
  np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(ours_vjp(cotangent)[0], theirs_vjp(cotangent)[0])
  # After a ReLU, windows of zeros tie; the ReLU stops their gradient, so
  # the network's gradient is the same either way.
  relu_grad = lambda pool: jax.grad(lambda y: jnp.sum(cotangent * pool(nn.relu(y))))(x - 1.0)
  np.testing.assert_array_equal(relu_grad(layers.max_pool_2x2), relu_grad(flax_pool))


def test_upsample_bilinear_2x_equals_jax_image_resize_with_its_gradient():
  x = random_normal((2, 5, 7, 3))
  cotangent = random_normal((2, 10, 14, 3), seed=1)
  ours, ours_vjp = jax.vjp(layers.upsample_bilinear_2x, x)
  theirs, theirs_vjp = jax.vjp(lambda y: jax.image.resize(y, (2, 10, 14, 3), 'bilinear'), x)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)
  np.testing.assert_allclose(ours_vjp(cotangent)[0], theirs_vjp(cotangent)[0], rtol=0, atol=1e-5)


def test_gaussian_filter_is_a_zero_padded_separable_gaussian():
  x = np.asarray(random_normal((2, 23, 17, 3)))
  offsets = np.arange(11) - 5.0
  taps = np.exp(-0.5 * (offsets / 1.5) ** 2)
  taps /= taps.sum()
  expected = ndimage.correlate1d(x, taps, axis=1, mode='constant')
  expected = ndimage.correlate1d(expected, taps, axis=2, mode='constant')
  ours = losses.gaussian_filter_same(11, 1.5)(jnp.asarray(x))
  np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-6)


def test_bfloat16_compute_keeps_float32_parameters_and_output():
  model = SegmentationNet(4, 0.9, 1e-5, axis_name=None)
  half = model.clone(dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).random((4, 16, 16, 3), np.float32))
  variables = jax.jit(lambda y: half.init(jax.random.key(0, impl='rbg'), y, train=False))(x)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  assert 'bf16' in str(jax.make_jaxpr(lambda v: half.apply(v, x, train=False))(variables))
  # The last layer (one output channel) computes in float32, the others in bfloat16.
  dtypes = conv_output_dtypes(half, variables, x)
  assert dtypes.pop(1) == {jnp.dtype(jnp.float32)}
  assert set.union(*dtypes.values()) == {jnp.dtype(jnp.bfloat16)}

  def apply(m, params):
    out, updates = m.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                           train=True, mutable=['batch_stats'])
    return out, updates['batch_stats']

  # Jitted: op by op, each layer's ops would compile separately.
  out, stats = jax.jit(functools.partial(apply, half))(variables['params'])
  reference, _ = jax.jit(functools.partial(apply, model))(variables['params'])
  assert out.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(stats)} == {jnp.dtype(jnp.float32)}
  # bfloat16 keeps 8 significant bits: a few percent after 13 layers.
  assert float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference)) < 0.1
  grads = jax.jit(jax.grad(lambda p: jnp.mean(apply(half, p)[0] ** 2)))(variables['params'])
  for leaf in jax.tree.leaves(grads):
    assert leaf.dtype == jnp.float32
    assert np.all(np.isfinite(leaf))


def test_float64_compute_leaves_no_layer_in_float32():
  """compute_dtype float64 (the reference of tests/parallel_steps.py) reaches the map."""
  model = SegmentationNet(4, 0.9, 1e-5, axis_name=None)
  x = jnp.zeros((2, 16, 16, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0, impl='rbg'), x, train=False))
  assert float64_output_dtypes(model.clone(dtype=jnp.float64), variables, x) == {
      jnp.dtype(jnp.float64)}
  # Without it, the last layer and the map compute in float32 (`precision.widen`).
  assert jax.eval_shape(lambda v: model.apply(v, x, train=False), variables).dtype == jnp.float32


def test_mean_error_is_the_mean_absolute_or_squared_error_and_names_a_bad_norm():
  predicted, target = jnp.array([[0.0, 1.0], [2.0, 4.0]]), jnp.array([[1.0, 1.0], [0.0, 1.0]])
  assert float(losses.mean_error(predicted, target, 'l1')) == pytest.approx((1 + 0 + 2 + 3) / 4)
  assert float(losses.mean_error(predicted, target, 'l2')) == pytest.approx((1 + 0 + 4 + 9) / 4)
  with pytest.raises(ValueError, match="error norm 'l3' must be one of"):
    losses.mean_error(predicted, target, 'l3')
