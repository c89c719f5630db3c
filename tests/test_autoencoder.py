"""Bauer's autoencoder (size, shapes, BatchNorm) and masked contrast objectives."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import parallel_steps  # tests/parallel_steps.py
from layer_dtypes import conv_output_dtypes, float64_output_dtypes  # tests/layer_dtypes.py
from twostage_jax import losses
from twostage_jax.methods.bauer.model import BauerAutoencoder


def paper_model():
  return BauerAutoencoder(
      encoder_widths=(32, 64, 128), sdc_blocks=4, sdc_filters=64,
      sdc_dilations=(1, 2, 4, 8, 16), sdc_kernel=5, bn_momentum=0.9,
      bn_epsilon=1e-5, axis_name=None)


def small_model(axis_name=None, dtype=jnp.float32):
  # Three poolings like the paper (inputs must be multiples of 8), narrow
  # layers to keep the CPU test fast.
  return BauerAutoencoder(
      encoder_widths=(4, 8, 8), sdc_blocks=2, sdc_filters=4,
      sdc_dilations=(1, 2, 4), sdc_kernel=3, bn_momentum=0.9,
      bn_epsilon=1e-5, axis_name=axis_name, dtype=dtype)


# Table 1 of Bauer's paper, row by row: layer type,
# number of filters, filter size. An SDC row is five dilated convolutions of
# that many filters each, concatenated.
TABLE_1 = (
    ('conv', 32, 3), ('conv', 32, 3), ('maxpool', None, 2),
    ('conv', 64, 3), ('conv', 64, 3), ('maxpool', None, 2),
    ('conv', 128, 3), ('conv', 128, 3), ('maxpool', None, 2),
    ('sdc', 64, 5), ('sdc', 64, 5), ('sdc', 64, 5), ('sdc', 64, 5),
    ('conv', 256, 3),
    ('transp', 256, 3), ('conv', 256, 3), ('conv', 128, 3),
    ('transp', 128, 3), ('conv', 128, 3), ('conv', 64, 3),
    ('transp', 64, 3), ('conv', 64, 3), ('conv', 32, 3),
    ('conv', 3, 1),
)


def table_1_parameter_count() -> int:
  """Parameters of Table 1's network for RGB input.

  Where the table is silent: a convolution followed by BatchNorm has no bias
  (BatchNorm's shift replaces it) and BatchNorm adds a scale and a shift per
  channel (its running statistics are not parameters); the last convolution,
  which the text says has no BatchNorm, has a bias. An SDC block's BatchNorm
  counts 2 x 320 whether it normalises each dilated convolution or their
  concatenation.
  """
  channels, total = 3, 0
  for index, (kind, filters, size) in enumerate(TABLE_1):
    if kind == 'maxpool':
      continue
    outputs = 5 * filters if kind == 'sdc' else filters
    weights = size * size * channels * outputs
    last = index == len(TABLE_1) - 1
    total += weights + (filters if last else 2 * outputs)
    channels = outputs
  return total


def test_parameter_count_is_that_of_the_papers_table_1():
  expected = table_1_parameter_count()
  for model in (paper_model(), paper_model().clone(dtype=jnp.bfloat16)):
    variables = jax.eval_shape(lambda model=model: model.init(
        jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False))
    assert sum(x.size for x in jax.tree.leaves(variables['params'])) == expected


@pytest.fixture(scope='module')
def small_variables():
  # Parameter shapes do not depend on the image size: initialise once, small.
  # The default axis_name ('data') is only used while training, so
  # initialising and evaluating outside a mapped context works.
  return jax.jit(lambda x: small_model(axis_name='data').init(
      jax.random.key(0, impl='rbg'), x, train=False))(jnp.zeros((1, 16, 16, 3)))


def random_images(shape):
  return jnp.asarray(np.random.default_rng(0).random(shape, np.float32))


def test_reconstruction_has_input_shape_values_in_unit_range_and_size_is_checked(
    small_variables):
  model = small_model(axis_name='data')
  x = random_images((2, 64, 64, 3))
  y = jax.jit(functools.partial(model.apply, train=False))(small_variables, x)
  assert y.shape == (2, 64, 64, 3)
  assert y.dtype == jnp.float32
  assert bool(jnp.all((y >= 0.0) & (y <= 1.0)))
  with pytest.raises(ValueError, match=r'multiples of 8 .*got 60x60'):
    jax.eval_shape(functools.partial(model.apply, train=False), small_variables,
                   jnp.ones((2, 60, 60, 3)))


def test_training_updates_batch_stats_and_averages_them_over_the_data_axis(
    small_variables):
  x = random_images((4, 16, 16, 3))
  _, updates = jax.jit(functools.partial(small_model().apply, train=True,
                                         mutable=['batch_stats']))(small_variables, x)
  before = jax.tree.leaves(small_variables['batch_stats'])
  after = jax.tree.leaves(updates['batch_stats'])
  assert len(after) == len(before) > 0
  for old, new in zip(before, after):
    assert not np.allclose(old, new)

  # Two shards of two images under a named axis give the statistics of the
  # whole batch of four: two layouts of one computation, compared in float64
  # to the tolerance tests/parallel_steps.py derives for them.
  with jax.enable_x64(True):
    variables, x64 = parallel_steps.float64(small_variables), parallel_steps.float64(x)
    model = small_model(axis_name='data', dtype=jnp.float64)
    whole = jax.jit(lambda v, y: model.clone(axis_name=None).apply(
        v, y, train=True, mutable=['batch_stats'])[1])(variables, x64)
    sharded = jax.jit(jax.vmap(
        lambda v, shard: model.apply(v, shard, train=True, mutable=['batch_stats'])[1],
        in_axes=(None, 0), axis_name='data'))(variables, x64.reshape((2, 2) + x.shape[1:]))
  start = parallel_steps.keyed(variables['batch_stats'])
  whole = parallel_steps.keyed(whole['batch_stats'])
  for shard in (0, 1):
    parallel_steps.assert_same_change(
        start, parallel_steps.keyed(jax.tree.map(lambda a, i=shard: a[i], sharded['batch_stats'])),
        whole, prefixes=('',))


def test_float64_compute_leaves_no_layer_in_float32(small_variables):
  """compute_dtype float64 (the reference of tests/parallel_steps.py) reaches the output."""
  x = jnp.zeros((2, 16, 16, 3), jnp.float32)
  assert float64_output_dtypes(small_model(dtype=jnp.float64), small_variables, x) == {
      jnp.dtype(jnp.float64)}


def test_bfloat16_compute_keeps_float32_parameters_and_output(small_variables):
  assert {leaf.dtype for leaf in jax.tree.leaves(small_variables)} == {jnp.dtype(jnp.float32)}
  x = random_images((4, 16, 16, 3))

  def apply(model, params):
    return model.apply({'params': params, 'batch_stats': small_variables['batch_stats']}, x,
                       train=True, mutable=['batch_stats'])

  half = small_model(dtype=jnp.bfloat16)
  assert 'bf16' in str(jax.make_jaxpr(lambda p: apply(half, p))(small_variables['params']))
  # The last layer (three output channels) computes in float32, the others in bfloat16.
  dtypes = conv_output_dtypes(half, small_variables, x)
  assert dtypes.pop(3) == {jnp.dtype(jnp.float32)}
  assert set.union(*dtypes.values()) == {jnp.dtype(jnp.bfloat16)}
  # Jitted: op by op, each layer's ops would compile separately.
  out, updates = jax.jit(functools.partial(apply, half))(small_variables['params'])
  reference, _ = jax.jit(functools.partial(apply, small_model()))(small_variables['params'])
  assert out.dtype == jnp.float32
  assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  assert float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference)) < 0.05
  grads = jax.jit(jax.grad(lambda p: jnp.mean(apply(half, p)[0] ** 2)))(
      small_variables['params'])
  for leaf in jax.tree.leaves(grads):
    assert leaf.dtype == jnp.float32
    assert np.all(np.isfinite(leaf))


# A batch of two 2x2 RGB samples with hand-chosen values.
# Sample 0: X = 0.5 everywhere; pixel (0, 0) is modified, X_hat = (0.9, 0.5,
# 0.1) there, so M = [[1, 0], [0, 0]] and D = (0.4, 0, 0.4) at (0, 0), 0
# elsewhere. F - X = (0.2, 0.1, 0.2) at (0, 0), (0.3, 0.4, 0) at (0, 1), 0 at
# the other two pixels.
# Sample 1: no modification (M empty, X_hat = X = 0.2), F - X = -0.1 everywhere.
LAM = 0.7


def example_batch():
  target = np.full((2, 2, 2, 3), 0.5, np.float32)
  target[1] = 0.2
  distorted = target.copy()
  distorted[0, 0, 0] = (0.9, 0.5, 0.1)
  mask = np.zeros((2, 2, 2), np.float32)
  mask[0, 0, 0] = 1.0
  error = np.zeros_like(target)
  error[0, 0, 0] = (0.2, 0.1, 0.2)
  error[0, 0, 1] = (0.3, 0.4, 0.0)
  error[1] = -0.1
  output = target + error
  return tuple(jnp.asarray(a) for a in (output, target, distorted, mask))


# M and M_bar have the image's shape n x m x 3, so ||M_bar||_1 counts 3
# elements per normal pixel, like ||D||_1.
# Sample 0: ||M_bar * (F - X)||_2 = sqrt(0.09 + 0.16) = 0.5 over 3 normal
# pixels, ||M_bar||_1 = 9; ||M * (F - X)||_2 = sqrt(0.04 + 0.01 + 0.04) = 0.3,
# ||M||_1 = 3; ||D * (F - X)||_2 = sqrt(0.08^2 + 0.08^2) = 0.08 sqrt(2),
# ||D||_1 = 0.8.
# Sample 1: ||F - X||_2 = sqrt(12 * 0.01) over 4 normal pixels, ||M_bar||_1 =
# 12; the modified terms have zero normalisers and vanish.
NORMAL = (0.5 / 9, math.sqrt(0.12) / 12)
MODIFIED_1 = (0.3 / 3, 0.0)
MODIFIED_3 = (0.08 * math.sqrt(2) / 0.8, 0.0)
HAND_1 = [LAM * n + (1 - LAM) * m for n, m in zip(NORMAL, MODIFIED_1)]
HAND_3 = [LAM * n - (1 - LAM) * m for n, m in zip(NORMAL, MODIFIED_3)]


def loss_config(objective, lam=LAM):
  return ml_collections.ConfigDict({'objective': objective, 'lam': lam})


def per_sample(objective, output, target, distorted, mask, lam=LAM):
  """The training loss of each sample on its own (a batch of one)."""
  return [float(losses.masked_contrast_loss(
      output[i:i + 1], target[i:i + 1], distorted[i:i + 1], mask[i:i + 1],
      loss_config(objective, lam))[0]) for i in range(len(output))]


def test_objectives_match_hand_computation():
  output, target, distorted, mask = example_batch()
  np.testing.assert_allclose(per_sample(1, output, target, distorted, mask), HAND_1, rtol=1e-5)
  np.testing.assert_allclose(per_sample(3, output, target, distorted, mask), HAND_3, rtol=1e-5)


def test_lambda_one_keeps_only_the_normal_term():
  output, target, distorted, mask = example_batch()
  for objective in (1, 3):
    np.testing.assert_allclose(
        per_sample(objective, output, target, distorted, mask, 1.0), NORMAL, rtol=1e-5)


def test_objective_3_pushes_the_output_away_from_x_inside_d_and_towards_it_outside():
  output, target, distorted, mask = example_batch()
  loss = lambda f: losses.masked_contrast_loss(f, target, distorted, mask, loss_config(3))[0]
  grad = np.asarray(jax.grad(loss)(output))
  error = np.asarray(output - target)
  # Modified pixel (0, 0): the normal term is masked out there; where D > 0
  # (channels 0 and 2) the gradient has the opposite sign of F - X, so a
  # descent step moves F away from X; where D = 0 (channel 1) it is zero.
  assert grad[0, 0, 0, 0] * error[0, 0, 0, 0] < 0
  assert grad[0, 0, 0, 2] * error[0, 0, 0, 2] < 0
  assert grad[0, 0, 0, 1] == 0.0
  # Normal pixels: a descent step moves F towards X.
  assert grad[0, 0, 1, 0] * error[0, 0, 1, 0] > 0
  assert grad[0, 0, 1, 1] * error[0, 0, 1, 1] > 0
  assert np.all(grad[1] * error[1] > 0)
  # Moving the modified pixel further from X lowers the loss.
  further = output.at[0, 0, 0].add(0.05 * jnp.sign(output[0, 0, 0] - target[0, 0, 0]))
  assert float(loss(further)) < float(loss(output))


@pytest.mark.parametrize('mask_value', [0.0, 1.0])
@pytest.mark.parametrize('offset', [0.0, 0.25])
def test_empty_and_full_masks_give_finite_losses_and_gradients(mask_value, offset):
  # mask_value 0: no modification (M empty, X_hat = X, so D = 0).
  # mask_value 1: the whole image is modified. offset 0 makes F - X exactly
  # zero, where the norm is not differentiable.
  target = jnp.full((2, 4, 4, 3), 0.4)
  distorted = target + 0.3 * mask_value
  mask = jnp.full((2, 4, 4), mask_value)
  output = target + offset
  for objective in (1, 3):
    def loss(f, objective=objective):
      return losses.masked_contrast_loss(
          f, target, distorted, mask, loss_config(objective))[0]
    value, grad = jax.value_and_grad(loss)(output)
    assert np.isfinite(float(value))
    assert np.all(np.isfinite(np.asarray(grad)))
    if offset == 0.0:
      assert float(value) == 0.0
  # Per-sample values by hand (4 x 4 x 3 = 48 elements): empty mask leaves
  # lam * ||F - X||_2 / 48; full mask leaves -(1 - lam) ||D * (F - X)||_2 /
  # ||D||_1 for objective 3 and (1 - lam) ||F - X||_2 / 48 for objective 1.
  norm = offset * math.sqrt(48)
  per_sample_3 = per_sample(3, output, target, distorted, mask)
  per_sample_1 = per_sample(1, output, target, distorted, mask)
  if mask_value == 0.0:
    expected_3 = expected_1 = LAM * norm / 48
  else:
    expected_3 = -(1 - LAM) * (0.3 * norm) / (0.3 * 48)
    expected_1 = (1 - LAM) * norm / 48
  np.testing.assert_allclose(per_sample_3, [expected_3] * 2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(per_sample_1, [expected_1] * 2, rtol=1e-5, atol=1e-7)


def test_masked_contrast_loss_takes_objective_and_lambda_from_the_config():
  output, target, distorted, mask = example_batch()
  loss, metrics = losses.masked_contrast_loss(
      output, target, distorted, mask, loss_config(1))
  assert float(loss) == pytest.approx(np.mean(HAND_1), rel=1e-5)
  assert float(metrics['loss']) == pytest.approx(float(loss))
  assert float(metrics['normal_term']) == pytest.approx(LAM * np.mean(NORMAL), rel=1e-5)
  assert float(metrics['modified_term']) == pytest.approx(
      (1 - LAM) * np.mean(MODIFIED_1), rel=1e-5)
  loss, metrics = losses.masked_contrast_loss(
      output, target, distorted, mask, loss_config(3))
  assert float(loss) == pytest.approx(np.mean(HAND_3), rel=1e-5)
  assert float(metrics['modified_term']) == pytest.approx(
      (1 - LAM) * np.mean(MODIFIED_3), rel=1e-5)
  loss, _ = losses.masked_contrast_loss(
      output, target, distorted, mask, loss_config(3, lam=1.0))
  assert float(loss) == pytest.approx(np.mean(NORMAL), rel=1e-5)
  with pytest.raises(ValueError, match='`objective`'):
    losses.masked_contrast_loss(output, target, distorted, mask, loss_config(2))
