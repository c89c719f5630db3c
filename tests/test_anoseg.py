"""AnoSeg: coordinate channels, networks, losses, the adversarial steps, a short run."""

import functools
import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

import child_process  # tests/child_process.py
import float32_tolerance  # tests/float32_tolerance.py
import parallel_steps  # tests/parallel_steps.py
import tiny_runs  # tests/tiny_runs.py
from configs import anoseg
from configs import anoseg_cpu
from twostage_jax import config_validation
from twostage_jax import data
from twostage_jax import methods
from twostage_jax.evaluation import evaluate
from twostage_jax.evaluation import metrics
from twostage_jax.inference import calibration
from twostage_jax.inference import detector
from twostage_jax.inference import engine
from twostage_jax.methods.anoseg import adversarial_losses as losses
from twostage_jax.methods.anoseg import method as anoseg_method
from twostage_jax.methods.anoseg import model as models
from twostage_jax.runtime import parallel
from twostage_jax.runtime import pipeline
from twostage_jax.runtime.parallel import DATA_AXIS
from twostage_jax.training import train_state
from twostage_jax.workdir import run_config

METHOD = methods.get('anoseg')


# configs/anoseg_cpu.py at 32x32, with networks a few channels wide.
SMALL = {
    **tiny_runs.TINY_DEMO, 'category': 'weave',
    'model.encoder_widths': (4, 8, 8, 16), 'model.decoder_widths': (16, 8, 8, 8, 8, 8),
    'model.discriminator_widths': (8, 8, 16, 8), 'train.global_batch_size': 8,
    'train.tensorboard': False, 'export.platforms': ('cpu',),
}


def small_config(**extra):
  config = anoseg_cpu.get_config()
  config.update_from_flattened_dict({**SMALL, **extra})
  return config


@pytest.fixture(scope='module')
def config():
  return small_config()


def mixed_batch(config, stream=1):
  """A host batch of 8 with normal and anomalous samples."""
  images, _ = data.training_images(config)
  sample = METHOD.sampler_factory(config, 1, images)()
  plan = pipeline.BatchPlan(num_images=len(images), global_batch_size=8, local_batch_size=8,
                            process_index=0, seed=0, stream=stream)
  for step in range(20):
    batch = pipeline.build_batch(images, sample, plan, step)
    anomalous = batch['mask'].sum(axis=(1, 2)) > 0
    if 2 <= anomalous.sum() <= 6:
      return batch
  raise AssertionError('no mixed batch in 20 steps')


# --- coordinate channels and networks --------------------------------------------------


def test_coordinate_channels_are_rank_one_ramps_from_minus_one_to_one():
  coords = np.asarray(models.coordinate_channels(2, 4, 5))
  assert coords.shape == (2, 4, 5, 2)
  x, y = coords[0, ..., 0], coords[0, ..., 1]
  np.testing.assert_allclose(x[0], [-1, -0.5, 0, 0.5, 1])
  np.testing.assert_allclose(y[:, 0], [-1, -1 / 3, 1 / 3, 1], rtol=1e-6)
  assert np.linalg.matrix_rank(x) == 1 and np.linalg.matrix_rank(y) == 1
  assert (x == x[:1]).all() and (y == y[:, :1]).all()  # x varies along columns only
  np.testing.assert_array_equal(coords[0], coords[1])


def test_coordinate_channels_reach_the_encoder_only_when_switched_on(config):
  for switch, channels in ((True, 5), (False, 3)):
    config_ = config.copy_and_resolve_references()
    config_.model.coordinate_channels = switch
    state = jax.eval_shape(lambda c=config_: METHOD.create_state(c, train_state.prng_key(0), 1))
    stem = state.generator.params['encoder']['Conv_0']['kernel']
    assert stem.shape == (7, 7, channels, 4)


def _resnet18_parameters(in_channels, widths=(64, 128, 256, 512)):
  """ResNet-18's convolution layers: no conv biases, BN scale + shift per channel."""
  total = 7 * 7 * in_channels * widths[0] + 2 * widths[0]
  previous = widths[0]
  for stage, width in enumerate(widths):
    for block in range(2):
      total += 9 * previous * width + 2 * width + 9 * width * width + 2 * width
      if stage > 0 and block == 0:
        total += previous * width + 2 * width  # the 1x1 projection shortcut and its BN
      previous = width
  return total


def _decoder_parameters(out_channels, widths=(512, 256, 128, 128, 128, 128), in_channels=512):
  """Table 6's decoder: conv + BN, then (4x4 transposed conv + BN, conv + BN) x 5, conv + bias."""
  total = 9 * in_channels * widths[0] + 2 * widths[0]
  for previous, width in zip(widths[:-1], widths[1:]):
    total += 16 * previous * previous + 2 * previous + 9 * previous * width + 2 * width
  return total + 9 * widths[-1] * out_channels + out_channels


def _discriminator_parameters(in_channels=4, widths=(64, 128, 256, 512, 512, 512, 128)):
  """4x4 convs; the first has a bias and no BN, the others BN; a last 4x4 conv + bias to 1."""
  total = 16 * in_channels * widths[0] + widths[0]
  for previous, width in zip(widths[:-1], widths[1:]):
    total += 16 * previous * width + 2 * width
  return total + 16 * widths[-1] + 1


def count(params):
  return sum(x.size for x in jax.tree.leaves(params))


def test_paper_size_networks_have_the_parameters_table_6_gives_under_our_assumptions():
  """Assumptions: inputs are RGB + 2 coordinate channels (RGB + map + 2 for the detector);
  no bias before BatchNorm; the discriminators see concat(image, mask) without coordinates."""
  config = anoseg.get_config()
  shapes = jax.eval_shape(lambda: METHOD.create_state(config, train_state.prng_key(0), 1))
  assert count(shapes.generator.params['encoder']) == _resnet18_parameters(5)
  assert _resnet18_parameters(3) == 11_176_512  # torchvision's resnet18 without its fc layer
  assert count(shapes.generator.params['map_decoder']) == _decoder_parameters(1)
  assert count(shapes.generator.params['image_decoder']) == _decoder_parameters(3)
  assert count(shapes.discriminator.params) == _discriminator_parameters()
  detector_shapes = jax.eval_shape(
      lambda: METHOD.create_state(config, train_state.prng_key(0), 2))
  assert 'map_decoder' not in detector_shapes.generator.params
  assert (count(detector_shapes.generator.params)
          == _resnet18_parameters(6) + _decoder_parameters(3))
  assert count(detector_shapes.discriminator.params) == _discriminator_parameters()
  print('AnoSeg generator', count(shapes.generator.params), 'discriminator',
        count(shapes.discriminator.params))


def test_the_base_model_has_no_image_decoder_and_no_discriminator(config):
  config_ = config.copy_and_resolve_references()
  config_.loss.adversarial = False
  state = jax.eval_shape(lambda: METHOD.create_state(config_, train_state.prng_key(0), 1))
  assert state.discriminator is None and 'image_decoder' not in state.generator.params


def test_stage_2_is_the_detector_on_a_frozen_stage_1(config):
  """What the shared trainer asks the plug-in: which stages are frozen, stage 2's
  batch and the detector's score exist only with stage 2, and each stage's model."""
  assert METHOD.frozen_stages(1) == () and METHOD.frozen_stages(2) == (1,)
  assert METHOD.stage_batch(config, 1) is None and METHOD.stage_batch(config, 2) is not None
  assert METHOD.scores_fn(config, (1,)) is None
  assert METHOD.scores_fn(config, (1, 2)) is not None
  segmentation, detector = METHOD.create_model(config, 1), METHOD.create_model(config, 2)
  assert (segmentation.map_decoder, detector.map_decoder) == (True, False)
  assert detector.image_decoder


def test_the_discriminator_judges_image_and_mask_together():
  with jax.enable_x64(True):  # the fresh stage-1 state of the step tests below
    state, _, _ = float64_inputs(1)
    assert state.discriminator.params['Conv_0']['kernel'].shape[2] == 4
    images = jnp.asarray(np.random.default_rng(0).random((2, 32, 32, 3)))
    judge = functools.partial(state.discriminator.apply_fn,
                              {'params': state.discriminator.params,
                               'batch_stats': state.discriminator.batch_stats}, train=False)
    ones, holed = jnp.ones((2, 32, 32)), jnp.ones((2, 32, 32)).at[:, 8:16, 8:16].set(0)
    logits_ones, features = judge(anoseg_method._pair(images, ones))
    logits_holed, _ = judge(anoseg_method._pair(images, holed))
  assert features.shape == (2, 2 * 2 * 8)
  assert np.abs(np.asarray(logits_ones - logits_holed)).max() > 1e-6


def test_config_errors_name_the_key(config):
  bad = config.copy_and_resolve_references()
  bad.model.discriminator_widths = (8, 8, 16)
  with pytest.raises(ValueError, match=r'discriminator_widths has 3 entries.*give .* 4 widths'):
    config_validation.validate(bad)
  bad = config.copy_and_resolve_references()
  bad.image_size = 48
  with pytest.raises(ValueError, match='image_size = 48 must be a multiple of 32'):
    config_validation.validate(bad)
  bad = config.copy_and_resolve_references()
  bad.eval.image_score = 'mean'
  with pytest.raises(ValueError, match="eval.image_score = 'mean' must be 'detector' or 'map'"):
    config_validation.validate(bad)
  bad = config.copy_and_resolve_references()
  bad.loss.segmentation_norm = 'l3'
  with pytest.raises(ValueError, match="segmentation_norm = 'l3'"):
    config_validation.validate(bad)


# --- losses on hand-computed cases ------------------------------------------------------


def test_segmentation_loss_is_the_mean_absolute_or_squared_error():
  predicted = jnp.array([[[0.0, 0.5], [1.0, 0.25]]])
  target = jnp.array([[[1.0, 0.5], [0.0, 0.0]]])
  assert float(losses.segmentation_loss(predicted, target, 'l1')) == pytest.approx(2.25 / 4)
  assert float(losses.segmentation_loss(predicted, target, 'l2')) == pytest.approx(2.0625 / 4)


def test_masked_reconstruction_loss_counts_normal_pixels_only_per_sample():
  images = jnp.zeros((2, 1, 2, 3))
  reconstructions = jnp.stack([jnp.full((1, 2, 3), 0.5), jnp.full((1, 2, 3), 0.2)])
  reconstructions = reconstructions.at[0, 0, 1].set(1.0)  # under the anomaly: ignored
  normal = jnp.array([[[1.0, 0.0]], [[1.0, 1.0]]])
  # sample 0: 3 channels x 0.5 over 3 normal elements -> 0.5; sample 1: 0.2.
  value = float(losses.masked_reconstruction_loss(images, reconstructions, normal))
  assert value == pytest.approx((0.5 + 0.2) / 2)
  assert float(losses.masked_reconstruction_loss(
      images, reconstructions, jnp.zeros((2, 1, 2)))) == 0.0


def test_binary_cross_entropy_and_the_distances():
  logits = jnp.array([0.0, 2.0])
  np.testing.assert_allclose(losses.binary_cross_entropy(logits, 1.0),
                             [np.log(2), np.log1p(np.exp(-2.0))], rtol=1e-6)
  np.testing.assert_allclose(losses.binary_cross_entropy(logits, 0.0),
                             [np.log(2), np.log1p(np.exp(2.0))], rtol=1e-6)
  np.testing.assert_allclose(losses.feature_distance(jnp.array([[1.0, 2.0]]),
                                                     jnp.array([[0.0, 0.0]])), [2.5])
  np.testing.assert_allclose(losses.image_distance(jnp.ones((1, 2, 2, 1)),
                                                   jnp.zeros((1, 2, 2, 1))), [1.0])


def test_weighted_mean_is_over_the_weighted_samples_of_every_device():
  values = jnp.array([1.0, 2.0, 3.0, 10.0])
  weights = jnp.array([1.0, 0.0, 1.0, 0.0])
  assert float(losses.weighted_mean(values, weights, None)) == pytest.approx(2.0)
  assert float(losses.weighted_mean(values, jnp.zeros(4), None)) == 0.0
  mesh = Mesh(np.array(jax.devices()[:4]), (DATA_AXIS,))
  per_device = jax.shard_map(
      lambda v, w: jax.lax.pmean(losses.weighted_mean(v, w, DATA_AXIS), DATA_AXIS),
      mesh=mesh, in_specs=(jax.P(DATA_AXIS), jax.P(DATA_AXIS)), out_specs=jax.P(),
      check_vma=False)
  assert float(per_device(values, weights)) == pytest.approx(2.0)


# --- the adversarial steps -------------------------------------------------------------


def sgd_state(config, stage, key=0):
  """The stage's state with SGD for both networks, so parameter changes compare linearly."""
  state = METHOD.create_state(config, train_state.prng_key(key), stage)
  sgd = optax.sgd(0.1)
  generator = state.generator.replace(tx=sgd, opt_state=sgd.init(state.generator.params))
  discriminator = state.discriminator.replace(
      tx=sgd, opt_state=sgd.init(state.discriminator.params))
  return state.replace(generator=generator, discriminator=discriminator)


def _times_generator_weights(config, factor):
  """`config` with every weight of the generator's loss (not the discriminator's) times `factor`."""
  changed = config.copy_and_resolve_references()
  for section in ('loss', 'detector'):
    for key in changed[section]:
      if key.endswith('_weight') and key != 'classification_weight':
        changed[section][key] *= factor
  return changed


def float64_config(generator_weights='config'):
  """The small config computing in float64; generator_weights 'changed': the adversarial and
  feature terms off, the generator's other loss terms weighted 7x."""
  config = small_config(**{'model.compute_dtype': 'float64'})
  if generator_weights == 'changed':
    config = _times_generator_weights(config, 7.0)
    config.loss.adversarial_weight = 0.0
    config.detector.adversarial_weight = config.detector.feature_weight = 0.0
  return config


@functools.cache
def float64_inputs(stage):
  """(state, the state with another discriminator, a mixed batch) of `stage` in float64.

  Built once for the tests of both steps; call under `jax.enable_x64(True)`.
  """
  config = float64_config()
  batch = {k: jnp.asarray(v) for k, v in mixed_batch(config).items()}
  if stage == 2:
    stage1 = train_state.variables_of(METHOD.create_state(config, train_state.prng_key(5), 1))
    batch = METHOD.stage_batch(config, 2)((stage1,), batch)
  state = parallel_steps.float64(sgd_state(config, stage))
  other = state.replace(
      discriminator=parallel_steps.float64(sgd_state(config, stage, key=9)).discriminator)
  return state, other, parallel_steps.float64(batch)


@functools.cache
def float64_step(stage, num_devices, generator_weights='config'):
  """(mesh, the compiled float64 step of `stage` on the first `num_devices` devices).

  Built once per set of arguments (pass them positionally): each new
  wrapper compiles again, about 10 s for AnoSeg's steps.
  """
  mesh = Mesh(np.array(jax.devices()[:num_devices]), (DATA_AXIS,))
  config = float64_config(generator_weights)
  return mesh, parallel.data_parallel(METHOD.train_step(config, stage), mesh)


def one_step(stage, state, batch, num_devices, generator_weights='config'):
  """Host variables and metrics after one float64 step; call under `jax.enable_x64(True)`."""
  mesh, step = float64_step(stage, num_devices, generator_weights)
  # A copy: the step donates its state.
  state = jax.device_put(jax.tree.map(np.array, state), parallel.replicated(mesh))
  new_state, step_metrics = step(state, jax.device_put(batch, parallel.batch_sharded(mesh)),
                                 train_state.prng_key(0))
  return parallel.to_host(train_state.variables_of(new_state)), parallel.to_host(step_metrics)


def _on_one_device(config, state, batch):
  """(state, metrics) after one step of `config`'s stage 1 on 1 device."""
  mesh = Mesh(np.array(jax.devices()[:1]), (DATA_AXIS,))
  step = parallel.data_parallel(METHOD.train_step(config, 1), mesh)
  return step(jax.device_put(jax.tree.map(np.array, state), parallel.replicated(mesh)),
              jax.device_put(batch, parallel.batch_sharded(mesh)), train_state.prng_key(0))


def _step_with_diagnostics(config, state, batch):
  """Encoder parameters before and after one float64 SGD step on 1 device, and its metrics."""
  before = jax.tree.map(np.array, state.generator.params['encoder'])
  new_state, step_metrics = _on_one_device(config, state, batch)
  after = parallel.to_host(new_state.generator.params['encoder'])
  return before, after, parallel.to_host(step_metrics)


@pytest.mark.slow
def test_the_diagnostics_measure_each_terms_pull_on_the_encoder_and_change_nothing():
  with jax.enable_x64(True):
    state, _, batch = float64_inputs(1)
    config = float64_config()
    measured = config.copy_and_resolve_references()
    measured.diagnostics = True
    before, plain, _ = _step_with_diagnostics(config, state, batch)
    _, after, metrics_on = _step_with_diagnostics(measured, state, batch)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(after)):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)  # measuring moves nothing
    for term in ('segmentation', 'reconstruction', 'adversarial'):
      assert metrics_on[f'encoder_grad_{term}'] > 0
    for pair in ('real', 'fake'):
      assert 0 <= metrics_on[f'discriminator_{pair}_accuracy'] <= 1

    # With L_Seg alone weighted, SGD moves the encoder by rate * its gradient.
    alone = measured.copy_and_resolve_references()
    alone.loss.reconstruction_weight = alone.loss.adversarial_weight = 0.0
    _, moved, metrics_alone = _step_with_diagnostics(alone, state, batch)
    step_norm = float(optax.global_norm(jax.tree.map(lambda a, b: a - b, moved, before)))
    assert metrics_alone['encoder_grad_segmentation'] == pytest.approx(step_norm / 0.1,
                                                                       rel=1e-9)
    assert metrics_alone['encoder_grad_reconstruction'] == 0
    assert metrics_alone['encoder_grad_adversarial'] == 0


def _one_device_step(config, state, batch):
  """Host variables (keyed) and metrics after one step of `config`'s stage 1 on 1 device."""
  new_state, step_metrics = _on_one_device(config, state, batch)
  return (parallel_steps.keyed(parallel.to_host(train_state.variables_of(new_state))),
          parallel.to_host(step_metrics))


def _at_step(state, step):
  return state.replace(generator=state.generator.replace(step=step))


@pytest.mark.slow
def test_before_the_image_branch_starts_the_map_trains_alone():
  """`loss.image_branch_from_step`: before it, the step is row 2's on the same networks
  (L_Re and the adversarial term weigh 0, the discriminator does not move); from it on,
  the paper's step. SGD, so the step counter changes no update."""
  with jax.enable_x64(True):
    state, _, batch = float64_inputs(1)
    delayed = float64_config()
    delayed.loss.image_branch_from_step = 5
    map_alone = float64_config()
    map_alone.loss.reconstruction_weight = map_alone.loss.adversarial_weight = 0.0
    start = parallel_steps.keyed(train_state.variables_of(state))
    early, _ = _one_device_step(delayed, state, batch)
    alone, _ = _one_device_step(map_alone, state, batch)
    late, _ = _one_device_step(delayed, _at_step(state, 5), batch)
    paper, _ = one_step(1, state, batch, 1)
  paper = parallel_steps.keyed(paper)
  for key in early:
    if "['discriminator']" in key:
      np.testing.assert_array_equal(early[key], start[key], err_msg=key)
    else:
      np.testing.assert_array_equal(early[key], alone[key], err_msg=key)
    np.testing.assert_array_equal(late[key], paper[key], err_msg=key)
  image_decoder = [k for k in early if "['params']['generator']['image_decoder']" in k]
  assert image_decoder and all((early[k] == start[k]).all() for k in image_decoder)
  assert any((late[k] != start[k]).any() for k in image_decoder)


@pytest.mark.slow
def test_a_detached_image_decoder_leaves_the_encoder_to_the_map():
  """`loss.image_decoder_trains_encoder=False`: L_Re sends the encoder nothing, the
  adversarial term only through the map, L_Seg as much as before; the image decoder
  still learns."""
  with jax.enable_x64(True):
    state, _, batch = float64_inputs(1)
    shared = float64_config()
    shared.diagnostics = True
    detached = shared.copy_and_resolve_references()
    detached.loss.image_decoder_trains_encoder = False
    # The same variables (the same key), the detached network applying them.
    detached_state = parallel_steps.float64(sgd_state(detached, 1))
    start = parallel_steps.keyed(train_state.variables_of(state))
    assert parallel_steps.keyed(train_state.variables_of(detached_state)).keys() == start.keys()
    after, measured = _one_device_step(detached, detached_state, batch)
    _, measured_shared = _one_device_step(shared, state, batch)
  assert measured['encoder_grad_reconstruction'] == 0
  assert 0 < measured['encoder_grad_adversarial'] < measured_shared['encoder_grad_adversarial']
  assert measured['encoder_grad_segmentation'] == pytest.approx(
      measured_shared['encoder_grad_segmentation'], rel=1e-12)
  image_decoder = [k for k in after if "['params']['generator']['image_decoder']" in k]
  assert any((after[k] != start[k]).any() for k in image_decoder)


NETWORKS = tuple(f"['{collection}']['{network}']" for collection in ('params', 'batch_stats')
                 for network in ('generator', 'discriminator'))


@pytest.mark.slow
@pytest.mark.parametrize('stage', [1, 2])
def test_eight_devices_equal_one_for_a_generator_and_discriminator_step(stage):
  """8 devices move both networks as 1 device does, to float64 precision.

  In float32 these tiny networks amplify the rounding that the two layouts
  order differently to a few percent of the step, more or less depending
  on the processor; in float64 the layouts agree to LAYOUT_TOLERANCE
  (tests/parallel_steps.py derives it). The yardstick of an error is the
  one-device step on a batch whose second half repeats the first.
  """
  assert jax.device_count() == 8
  with jax.enable_x64(True):
    state, _, batch = float64_inputs(stage)
    start = parallel_steps.keyed(train_state.variables_of(state))
    eight, metrics8 = one_step(stage, state, batch, 8)
    one, metrics1 = one_step(stage, state, batch, 1)
    half_batch = jax.tree.map(lambda x: np.concatenate([x[:4], x[:4]]), batch)
    half, _ = one_step(stage, state, half_batch, 1)
  assert metrics8.keys() == metrics1.keys() and 'discriminator_loss' in metrics1
  for key in metrics1:
    np.testing.assert_allclose(metrics8[key], metrics1[key],
                               rtol=parallel_steps.LAYOUT_TOLERANCE, err_msg=key)
  eight, one, half = map(parallel_steps.keyed, (eight, one, half))
  assert len(parallel_steps.groups(one, NETWORKS)) == 4  # parameters and statistics of both
  parallel_steps.assert_same_change(start, eight, one, NETWORKS)
  parallel_steps.assert_changed_unlike(start, half, one, NETWORKS)


def _subset(params, network):
  return {k: v for k, v in params.items() if f"['{network}']" in k}


@pytest.mark.slow
@pytest.mark.parametrize('stage', [1, 2])
def test_each_network_learns_from_its_own_loss_only(stage):
  """The generator's loss never moves the discriminator; the discriminator reaches the
  generator only through the adversarial and feature terms.

  Each comparison is exact, both ways: the update compared is computed from
  the same inputs by the same operations in both steps unless it depends on
  what changed (loss weights, or the discriminator's parameters). The steps
  run in float64 and share the layout test's one-device step.
  """
  with jax.enable_x64(True):
    state, other, batch = float64_inputs(stage)

    def params_after(generator_weights, state_):
      variables, _ = one_step(stage, state_, batch, 1, generator_weights)
      return parallel_steps.keyed(variables['params'])

    base, base_other = params_after('config', state), params_after('config', other)
    changed, changed_other = params_after('changed', state), params_after('changed', other)

  def moved(a, b, network):
    return any((a[k] != b[k]).any() for k in _subset(a, network))

  # Other generator weights (adversarial and feature terms off, the others 7x): the same
  # discriminator update, another generator update.
  for key in _subset(base, 'discriminator'):
    np.testing.assert_array_equal(changed[key], base[key], err_msg=key)
  assert moved(changed, base, 'generator')
  # Without the adversarial and feature terms another discriminator leaves the generator's
  # update as it was; with them (the config's weights) it changes it.
  for key in _subset(changed, 'generator'):
    np.testing.assert_array_equal(changed_other[key], changed[key], err_msg=key)
  assert moved(changed_other, changed, 'discriminator')
  assert moved(base_other, base, 'generator')


# --- a short run -----------------------------------------------------------------------


SHORT_RUN = {'train.num_steps': 120, 'stage2.num_steps': 10, 'train.log_every': 10,
             'train.checkpoint_every': 120}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir, variables before training) of a run of 120 + 10 steps at 32x32.

  Trained as a user trains, by main.py, and on one device: the tests' 8
  simulated devices share 2 cores and run these steps 6x slower.
  """
  config = small_config(**SHORT_RUN)
  workdir = str(tmp_path_factory.mktemp('run'))
  result = subprocess.run(
      child_process.main_command('anoseg_cpu.py', workdir, {**SMALL, **SHORT_RUN}),
      env=child_process.environment(1), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  initial = train_state.variables_of(METHOD.create_state(
      config, jax.random.fold_in(train_state.prng_key(config.seed), 1), 1))
  return config, workdir, initial


def synthetic_separation(config, variables):
  """Pixel AUROC of the anomaly map against the masks of 32 synthetic samples."""
  images, _ = data.training_images(config)
  sample = METHOD.sampler_factory(config, 1, images)()
  rng = np.random.default_rng(123)
  samples = [sample(images[i % len(images)].astype(np.float32) / 255.0, rng) for i in range(32)]
  batch = {'image': jnp.asarray(np.stack([s['image'] for s in samples]))}
  maps = METHOD.maps_fn(config, (1,))((variables,), batch)[anoseg_method.SEGMENTATION]
  return metrics.auroc(np.asarray(maps), np.stack([s['mask'] for s in samples]))


@pytest.mark.slow
def test_a_short_run_lowers_the_segmentation_loss_and_separates_anomalies(trained):
  config, workdir, initial = trained
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if '"stage": 1' in line or '"stage":1' in line]
  losses_ = [r['segmentation_loss'] for r in rows if 'segmentation_loss' in r]
  assert len(losses_) >= 10
  assert np.mean(losses_[-3:]) < 0.7 * np.mean(losses_[:2])
  model = engine.load_model(config, workdir)
  before = synthetic_separation(config, initial)
  after = synthetic_separation(config, model.variables[0])
  assert after > before + 0.1, (before, after)


@pytest.mark.slow
def test_evaluation_reports_the_map_score_and_the_detector_score(trained):
  config, workdir, _ = trained
  results = evaluate.evaluate(config, workdir)
  assert list(results['rows']) == ['anoseg', 'detector'] and results['final_map'] == 'detector'
  rows = results['rows']
  assert rows['anoseg']['pixel_auroc'] == rows['detector']['pixel_auroc']
  model = engine.load_model(config, workdir)
  test = data.category_test_set(config)
  maps, scores = engine.maps_and_scores(config, model, test.images)
  rule = engine.image_scores(config, {'m': maps['anoseg']})['m']
  float32_tolerance.assert_same_function(scores['anoseg'], rule)
  assert not np.allclose(scores['detector'], rule)  # Eq. 5, not the rule
  assert (scores['detector'] >= 0).all()
  # The compiled detector gives the final map and Eq. 5's score.
  final_maps, final_scores = jax.jit(detector.detector_fn(config, model))(test.images[:5])
  float32_tolerance.assert_same_function(final_maps, maps['detector'][:5])
  float32_tolerance.assert_same_function(final_scores, scores['detector'][:5])


@pytest.mark.slow
def test_the_image_score_is_selectable_and_thresholds_follow_it(trained):
  config, workdir, _ = trained
  by_map = config.copy_and_resolve_references()
  by_map.eval.image_score = 'map'
  model = engine.load_model(by_map, workdir)
  assert model.final_map == 'anoseg'
  thresholds = calibration.ensure_thresholds(by_map, workdir, model)
  assert thresholds['map'] == 'anoseg'
  detector_thresholds = calibration.ensure_thresholds(config, workdir,
                                                      engine.load_model(config, workdir))
  assert detector_thresholds['map'] == 'detector'
  assert detector_thresholds['image'] != thresholds['image']
  changed = config.copy_and_resolve_references()
  changed.detector.beta = 0.5
  recomputed = calibration.ensure_thresholds(changed, workdir,
                                             engine.load_model(changed, workdir))
  assert recomputed['detector'] == changed.detector.to_dict()
  assert recomputed['image'] != detector_thresholds['image']


def test_a_run_trained_before_a_key_was_added_loads_with_the_config_files_value(
    trained, tmp_path):
  """Detector.load on a workdir whose config.json predates `loss.image_decoder_trains_encoder`
  (which the map's network reads) takes the config file's value, as main.py does."""
  _, workdir, _ = trained
  older = str(tmp_path / 'older')
  shutil.copytree(workdir, older)
  with open(os.path.join(older, 'config.json'), encoding='utf-8') as f:
    saved = json.load(f)
  del saved['loss']['image_decoder_trains_encoder'], saved['loss']['image_branch_from_step']
  with open(os.path.join(older, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(saved, f)
  assert 'image_decoder_trains_encoder' not in run_config.load(older).loss
  images = np.stack([np.asarray(image) for image in data.training_images(
      small_config())[0][:3]])
  expected = detector.Detector.load(workdir).predict(images)
  found = detector.Detector.load(older).predict(images)
  np.testing.assert_array_equal(found.maps, expected.maps)
  np.testing.assert_array_equal(found.scores, expected.scores)
