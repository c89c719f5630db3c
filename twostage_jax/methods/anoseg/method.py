"""AnoSeg (paper 003) as a method: a segmentation GAN, then its anomaly detector.

Stage 1 trains AnoSeg: an encoder with a map decoder and an image decoder
(model.py) on normal images and hard-augmented CutPaste anomalies
(synthesis/cutpaste.py), with L_Seg, the masked reconstruction loss L_Re and
an adversarial loss whose discriminator judges (image, mask) pairs. Stage 2
trains the anomaly detector of Sec. 3.4 and Appendix A on stage 1's frozen
maps: a generator of the same structure without the map decoder reconstructs
the image from concat(image, map), its discriminator learns normal pairs
against reconstructed ones (Eq. 6) and against synthetic anomalies (L_cls),
and the generator also matches its features (L_fea). Eq. 5 scores an image.

The paper's masks and maps are 1 on normal pixels. That convention stays
inside this module: the shared machinery gets anomaly maps (1 - AnoSeg's
map) and gives masks with 1 on anomalous pixels, which `_normal` inverts.

Each stage's state is a `network_state.AdversarialState`; with
`loss.adversarial` off (the ablation's first two rows) stage 1 is the
generator alone, with the map decoder only, trained on L_Seg.
"""

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from twostage_jax import synthesis
from twostage_jax.methods import base
from twostage_jax.methods.anoseg import adversarial_losses as losses
from twostage_jax.methods.anoseg.model import ENCODER_STRIDE, AnoSegNet, Discriminator
from twostage_jax.runtime import pipeline
from twostage_jax.runtime.parallel import DATA_AXIS
from twostage_jax.training import network_state
from twostage_jax.training import precision

SEGMENTATION, DETECTOR = 'anoseg', 'detector'
IMAGE_SCORES = ('detector', 'map')  # eval.image_score: Eq. 5, or eval.score_rule of the map
# Stage 2's batch key holding stage 1's map of the image (1 = normal).
_STAGE1_MAP = 'anoseg_map'


def _normal(mask: jax.Array) -> jax.Array:
  """The paper's mask A (1 = normal) of a mask with 1 on anomalous pixels."""
  return 1.0 - precision.widen(mask)


def _pair(images: jax.Array, masks: jax.Array) -> jax.Array:
  """concat(image, mask): what the discriminators judge, (B, H, W, 4)."""
  images, masks = precision.widen(images), precision.widen(masks)
  return jnp.concatenate([images, masks.astype(images.dtype)[..., None]], -1)


def _network(variables: base.Variables, name: str) -> base.Variables:
  """One network's variables out of a stage's ('generator' or 'discriminator')."""
  return {'params': variables['params'][name], 'batch_stats': variables['batch_stats'][name]}


def _size_problems(config: ml_collections.ConfigDict) -> list[str]:
  size = config.image_size
  problems = []
  if size % ENCODER_STRIDE:
    problems.append(f'config.image_size = {size} must be a multiple of {ENCODER_STRIDE} '
                    '(the ResNet-18 encoder halves it 5 times)')
  depth = len(config.model.discriminator_widths)
  if size != 2 ** (depth + 1):
    problems.append(
        f'config.model.discriminator_widths has {depth} entries, which fits images of '
        f'{2 ** (depth + 1)}x{2 ** (depth + 1)}, not {size}x{size}: give '
        f'log2(image_size) - 1 = {max(0, round(math.log2(max(size, 1))) - 1)} widths '
        '(each halves the image; the last layer takes the remaining 2x2 to 1x1)')
  return problems


class AnoSeg(base.Method):
  """AnoSeg's segmentation network (stage 1) and its anomaly detector (stage 2)."""

  name = 'anoseg'
  stages = (1, 2)
  config_file = 'configs/anoseg.py'
  inference_sections = ('detector',)
  # The detector's weights of Eq. 5 only score trained maps; diagnostics only measure.
  per_run_keys = ('detector.alpha', 'detector.beta', 'diagnostics')
  config_rules = (
      ('model.encoder_widths', lambda v: len(v) == 4 and all(w > 0 for w in v),
       "4 positive widths (ResNet-18's stages)"),
      ('model.decoder_widths', lambda v: len(v) == 6 and all(w > 0 for w in v),
       '6 positive widths (a convolution, then one per upsampling)'),
      ('model.discriminator_widths', lambda v: len(v) > 0 and all(w > 0 for w in v),
       'a non-empty list of positive widths'),
      ('model.leaky_slope', lambda v: v >= 0, '0 or more'),
      ('loss.segmentation_norm', lambda v: v in losses.SEGMENTATION_NORMS,
       ' or '.join(map(repr, losses.SEGMENTATION_NORMS))),
      ('loss.segmentation_weight', lambda v: v >= 0, '0 or more'),
      ('loss.reconstruction_weight', lambda v: v >= 0, '0 or more'),
      ('loss.adversarial_weight', lambda v: v >= 0, '0 or more'),
      ('loss.image_branch_from_step', lambda v: isinstance(v, int) and v >= 0,
       'a whole number of steps, 0 or more'),
      ('loss.image_decoder_trains_encoder', lambda v: isinstance(v, bool), 'True or False'),
      ('detector.adversarial_weight', lambda v: v >= 0, '0 or more'),
      ('detector.reconstruction_weight', lambda v: v >= 0, '0 or more'),
      ('detector.feature_weight', lambda v: v >= 0, '0 or more'),
      ('detector.classification_weight', lambda v: v >= 0, '0 or more'),
      ('detector.alpha', lambda v: v >= 0, '0 or more'),
      ('detector.beta', lambda v: v >= 0, '0 or more'),
      ('stage2.num_steps', lambda v: v is None or v > 0, 'positive, or None (= train.num_steps)'),
      ('train.adam_b1', lambda v: 0 <= v < 1, 'in [0, 1)'),
      ('eval.image_score', lambda v: v in IMAGE_SCORES, ' or '.join(map(repr, IMAGE_SCORES))),
  )

  def config_problems(self, config: ml_collections.ConfigDict) -> list[str]:
    """The rules, and an image size the encoder and the discriminator fit."""
    problems = super().config_problems(config)
    if not problems:
      problems += _size_problems(config)
    return problems

  def _generator(self, config: ml_collections.ConfigDict, stage: int) -> AnoSegNet:
    model = config.model
    return AnoSegNet(
        encoder_widths=tuple(model.encoder_widths),
        decoder_widths=tuple(model.decoder_widths),
        map_decoder=stage == 1,
        image_decoder=stage == 2 or config.loss.adversarial,
        coordinate_channels=model.coordinate_channels,
        # Stage 2's generator has the image decoder alone: it always trains its encoder.
        image_decoder_trains_encoder=stage == 2 or config.loss.image_decoder_trains_encoder,
        bn_momentum=model.bn_momentum,
        bn_epsilon=model.bn_epsilon,
        dtype=precision.compute_dtype(config))

  def _discriminator(self, config: ml_collections.ConfigDict) -> Discriminator:
    model = config.model
    return Discriminator(widths=tuple(model.discriminator_widths),
                         leaky_slope=model.leaky_slope, bn_momentum=model.bn_momentum,
                         bn_epsilon=model.bn_epsilon, dtype=precision.compute_dtype(config))

  def create_model(self, config: ml_collections.ConfigDict, stage: int) -> nn.Module:
    """The generator of `stage`: AnoSeg (1) or the detector's (2)."""
    return self._generator(config, stage)

  def create_state(self, config: ml_collections.ConfigDict, key: jax.Array,
                   stage: int) -> network_state.AdversarialState:
    """Generator and discriminator of `stage`, each with Adam (b1 `train.adam_b1`)."""
    schedule = self.learning_rate(config, stage)
    size = config.image_size
    generator_key, discriminator_key = jax.random.split(key)
    channels = 3 if stage == 1 else 4  # the detector's generator also reads the map
    generator = network_state.create(
        self._generator(config, stage), generator_key,
        jnp.zeros((1, size, size, channels), jnp.float32),
        optax.adam(schedule, b1=config.train.adam_b1))
    discriminator = None
    if stage == 2 or config.loss.adversarial:
      discriminator = network_state.create(
          self._discriminator(config), discriminator_key, jnp.zeros((1, size, size, 4)),
          optax.adam(schedule, b1=config.train.adam_b1))
    return network_state.AdversarialState(generator, discriminator)

  def train_step(self, config: ml_collections.ConfigDict, stage: int):
    """Stage 1: `segmentation_step`; stage 2: `detector_step`."""
    if stage == 1:
      return functools.partial(segmentation_step, loss_config=config.loss,
                               diagnostics=config.diagnostics)
    return functools.partial(detector_step, detector_config=config.detector)

  def sampler_factory(self, config: ml_collections.ConfigDict, stage: int,
                      images: np.ndarray) -> pipeline.SamplerFactory:
    del stage, images
    return functools.partial(synthesis.CutPasteSampler, config)

  def frozen_stages(self, stage: int) -> tuple[int, ...]:
    return (1,) if stage == 2 else ()

  def stage_batch(self, config: ml_collections.ConfigDict, stage: int
                  ) -> base.StageBatchFn | None:
    """Stage 2's batch: the images with stage 1's maps of them."""
    if stage != 2:
      return None
    generator = self._generator(config, 1)

    def with_maps(frozen, batch):
      maps = generator.apply(_network(frozen[0], 'generator'), batch['image'], train=False)
      return {**batch, _STAGE1_MAP: maps['map']}

    return with_maps

  def map_names(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]
                ) -> tuple[str, ...]:
    """'anoseg' (scored by `eval.score_rule`); with the detector also 'detector' (Eq. 5)."""
    del config
    return (SEGMENTATION, DETECTOR) if 2 in trained else (SEGMENTATION,)

  def final_map(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]) -> str:
    """'detector' when trained and `eval.image_score` is 'detector', else 'anoseg'."""
    if 2 in trained and config.eval.image_score == 'detector':
      return DETECTOR
    return SEGMENTATION

  def maps_fn(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]) -> base.MapsFn:
    """1 - AnoSeg's map; the detector's row repeats it (it differs in its image score)."""
    generator = self._generator(config, 1)

    def maps(variables, batch):
      normal = generator.apply(_network(variables[0], 'generator'), batch['image'],
                               train=False)['map']
      anomaly = 1.0 - normal
      return {SEGMENTATION: anomaly, DETECTOR: anomaly} if 2 in trained else {
          SEGMENTATION: anomaly}

    return maps

  def scores_fn(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]
                ) -> base.ScoresFn | None:
    """Eq. 5 for the 'detector' row: alpha * L_MSE(f(x, 1), f(x_hat, A_hat)) + beta * L_MSE(x, x_hat)."""
    if 2 not in trained:
      return None
    generator = self._generator(config, 2)
    discriminator = self._discriminator(config)
    alpha, beta = config.detector.alpha, config.detector.beta

    def scores(variables, batch, maps):
      images = batch['image']
      normal_map = 1.0 - maps[SEGMENTATION]
      reconstructions = generator.apply(_network(variables[1], 'generator'),
                                        _pair(images, normal_map), train=False)['image']
      judge = functools.partial(discriminator.apply, _network(variables[1], 'discriminator'),
                                train=False)
      _, real = judge(_pair(images, jnp.ones_like(normal_map)))
      _, fake = judge(_pair(reconstructions, normal_map))
      return {DETECTOR: (alpha * losses.feature_distance(real, fake)
                         + beta * losses.image_distance(images, reconstructions))}

    return scores


def _judge(state: network_state.TrainState, params: Any, batch_stats: Any, inputs: jax.Array
           ) -> tuple[tuple[jax.Array, jax.Array], Any]:
  """The discriminator in training mode: ((logits, features), updated batch statistics)."""
  out, updates = state.apply_fn({'params': params, 'batch_stats': batch_stats}, inputs,
                                train=True, mutable=['batch_stats'])
  return out, updates['batch_stats']


def _generator_pass(state: network_state.TrainState, inputs: jax.Array):
  """The generator's outputs, the pullback of their gradients to its params, its statistics.

  The outputs are computed once: the discriminator's update reads them
  (without gradient), then the generator's loss of them is pulled back.
  """
  def generate(params):
    out, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats}, inputs,
                                  train=True, mutable=['batch_stats'])
    return out, updates['batch_stats']

  return jax.vjp(generate, state.params, has_aux=True)


def _update_generator(state: network_state.AdversarialState, discriminator, loss_fn,
                      outputs, pullback, batch_stats, metrics):
  """The generator's step on `loss_fn(outputs)`, with `discriminator` already updated."""
  (_, generator_metrics), output_grads = jax.value_and_grad(loss_fn, has_aux=True)(outputs)
  grads, = pullback(output_grads)
  generator = network_state.apply_mean_gradients(state.generator, grads, batch_stats)
  metrics = {**metrics, **jax.lax.pmean(generator_metrics, DATA_AXIS)}
  return network_state.AdversarialState(generator, discriminator), metrics


def segmentation_step(state: network_state.AdversarialState, batch: base.Batch, key: jax.Array,
                      loss_config: ml_collections.ConfigDict, diagnostics: bool = False
                      ) -> tuple[network_state.AdversarialState, dict[str, jax.Array]]:
  """One discriminator step, then one AnoSeg step, on this device's share of the batch.

  Discriminator: real concat(x, A) against fake concat(x_hat, A_hat)
  (Eq. 3). AnoSeg: segmentation_weight * L_Seg + reconstruction_weight *
  L_Re + adversarial_weight * (-log D(concat(x_hat, A_hat))), the
  non-saturating form of Eq. 3's generator term. Without a discriminator
  (`loss.adversarial` off) only L_Seg trains the map decoder; before step
  `loss.image_branch_from_step` neither L_Re nor the adversarial term counts
  and the discriminator is not updated.

  With `diagnostics` (config.diagnostics) the metrics also hold, per
  weighted term, the norm of the gradient it sends to the shared encoder
  (`encoder_grad_<term>`: one more pullback each) and the discriminator's
  accuracy on the real and the fake pairs before its update.
  """
  del key  # no stochastic layers
  images, normal = batch['image'], _normal(batch['mask'])
  outputs, pullback, generator_stats = _generator_pass(state.generator, images)
  discriminator, metrics = state.discriminator, {}
  # Before `image_branch_from_step` the map trains alone (L_Re and the adversarial
  # term weigh 0, the discriminator stays as it is): a warm start from row 2.
  delayed = discriminator is not None and loss_config.image_branch_from_step > 0
  image_branch_on = state.step >= loss_config.image_branch_from_step
  if discriminator is not None:
    fake = jax.lax.stop_gradient(_pair(outputs['image'], outputs['map']))

    def discriminator_loss(params):
      (real_logits, _), stats = _judge(discriminator, params, discriminator.batch_stats,
                                       _pair(images, normal))
      (fake_logits, _), stats = _judge(discriminator, params, stats, fake)
      loss = jnp.mean(losses.binary_cross_entropy(real_logits, 1.0)
                      + losses.binary_cross_entropy(fake_logits, 0.0))
      measured = {'discriminator_loss': loss}
      if diagnostics:
        measured.update(discriminator_real_accuracy=jnp.mean(real_logits > 0),
                        discriminator_fake_accuracy=jnp.mean(fake_logits < 0))
      return loss, (measured, stats)

    updated, metrics = network_state.update(discriminator, discriminator_loss)
    discriminator = updated if not delayed else jax.tree.map(
        lambda new, old: jnp.where(image_branch_on, new, old), updated, discriminator)

  def image_branch(weight):
    return jnp.where(image_branch_on, weight, 0.0) if delayed else weight

  weights = {'segmentation': loss_config.segmentation_weight,
             'reconstruction': image_branch(loss_config.reconstruction_weight),
             'adversarial': image_branch(loss_config.adversarial_weight)}

  def terms_of(out):
    terms = {'segmentation': losses.segmentation_loss(out['map'], normal,
                                                      loss_config.segmentation_norm)}
    if discriminator is not None:
      (logits, _), _ = _judge(discriminator, discriminator.params, discriminator.batch_stats,
                              _pair(out['image'], out['map']))
      terms['reconstruction'] = losses.masked_reconstruction_loss(images, out['image'], normal)
      terms['adversarial'] = jnp.mean(losses.binary_cross_entropy(logits, 1.0))
    return terms

  def generator_loss(out):
    terms = terms_of(out)
    loss = sum(weights[name] * value for name, value in terms.items())
    return loss, {'loss': loss, **{f'{name}_loss': value for name, value in terms.items()}}

  if diagnostics:
    weighted = lambda out: {name: weights[name] * value for name, value in terms_of(out).items()}
    metrics = {**metrics, **_encoder_gradient_norms(weighted, outputs, pullback)}
  return _update_generator(state, discriminator, generator_loss, outputs, pullback,
                           generator_stats, metrics)


def _encoder_gradient_norms(weighted_terms, outputs, pullback) -> dict[str, jax.Array]:
  """'encoder_grad_<term>': the norm of each weighted term's gradient on the shared encoder.

  Each term's gradient with respect to the generator's outputs is pulled
  back separately, then averaged over devices as the update averages them.
  """
  norms = {}
  names = weighted_terms(outputs).keys()
  for name in names:
    output_grads = jax.grad(lambda out, name=name: weighted_terms(out)[name])(outputs)
    grads, = pullback(output_grads)
    encoder = jax.lax.pmean(grads['encoder'], DATA_AXIS)
    norms[f'encoder_grad_{name}'] = optax.global_norm(encoder)
  return norms


def detector_step(state: network_state.AdversarialState, batch: base.Batch, key: jax.Array,
                  detector_config: ml_collections.ConfigDict
                  ) -> tuple[network_state.AdversarialState, dict[str, jax.Array]]:
  """One step of the anomaly detector's discriminator, then of its generator (Appendix A).

  With n the normal samples of the batch and s its synthetic anomalies:
  discriminator: L_adv^AD (Eq. 6: concat(x_n, 1) real, concat(x_hat_n,
  A_hat_n) fake) + classification_weight * L_cls (concat(x_n, 1) real,
  concat(x_s, A_s) fake); generator: adversarial_weight * (-log
  D(concat(x_hat_n, A_hat_n))) + reconstruction_weight * MSE(x_n, x_hat_n) +
  feature_weight * L_fea (f the discriminator's second-to-last layer).
  """
  del key
  config = detector_config
  images, normal_map = batch['image'], batch[_STAGE1_MAP]
  is_normal = (jnp.sum(batch['mask'], axis=(1, 2)) == 0).astype(jnp.float32)
  is_anomalous = 1.0 - is_normal
  mean_over = functools.partial(losses.weighted_mean, axis_name=DATA_AXIS)
  real = _pair(images, jnp.ones_like(normal_map))
  outputs, pullback, generator_stats = _generator_pass(state.generator, _pair(images, normal_map))
  fake = jax.lax.stop_gradient(_pair(outputs['image'], normal_map))
  synthetic = _pair(images, _normal(batch['mask']))
  discriminator = state.discriminator

  def discriminator_loss(params):
    (real_logits, _), stats = _judge(discriminator, params, discriminator.batch_stats, real)
    (fake_logits, _), stats = _judge(discriminator, params, stats, fake)
    (synthetic_logits, _), stats = _judge(discriminator, params, stats, synthetic)
    real_term = mean_over(losses.binary_cross_entropy(real_logits, 1.0), is_normal)
    adversarial = real_term + mean_over(losses.binary_cross_entropy(fake_logits, 0.0), is_normal)
    classification = real_term + mean_over(
        losses.binary_cross_entropy(synthetic_logits, 0.0), is_anomalous)
    loss = adversarial + config.classification_weight * classification
    return loss, ({'discriminator_loss': loss, 'discriminator_adversarial': adversarial,
                   'classification_loss': classification}, stats)

  discriminator, metrics = network_state.update(discriminator, discriminator_loss)
  (_, real_features), _ = _judge(discriminator, discriminator.params,
                                 discriminator.batch_stats, real)
  real_features = jax.lax.stop_gradient(real_features)

  def generator_loss(out):
    (logits, features), _ = _judge(discriminator, discriminator.params,
                                   discriminator.batch_stats, _pair(out['image'], normal_map))
    adversarial = mean_over(losses.binary_cross_entropy(logits, 1.0), is_normal)
    reconstruction = mean_over(losses.image_distance(images, out['image']), is_normal)
    feature = mean_over(losses.feature_distance(real_features, features), is_normal)
    loss = (config.adversarial_weight * adversarial + config.reconstruction_weight * reconstruction
            + config.feature_weight * feature)
    return loss, {'loss': loss, 'adversarial_loss': adversarial,
                  'reconstruction_loss': reconstruction, 'feature_loss': feature}

  return _update_generator(state, discriminator, generator_loss, outputs, pullback,
                           generator_stats, metrics)


METHOD = AnoSeg()
