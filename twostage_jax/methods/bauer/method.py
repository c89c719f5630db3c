"""Bauer's self-supervised autoencoder with the masked contrast objective, as a method.

A single network (stage 1) learns to reproduce the normal image from one
with a patch distorted; the anomaly map is the absolute reconstruction error
averaged over the colour channels. Evaluation adds Bauer's minimum-area
protocol (area_protocol.py).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from twostage_jax import losses
from twostage_jax import synthesis
from twostage_jax.methods import base
from twostage_jax.methods import synthesis_rules
from twostage_jax.methods.bauer import area_protocol
from twostage_jax.methods.bauer.model import BauerAutoencoder
from twostage_jax.runtime import pipeline
from twostage_jax.training import precision

AUTOENCODER = 'autoencoder'


def reconstruction_error_map(reconstructions: jax.Array, images: jax.Array) -> jax.Array:
  """Bauer's anomaly map (B, H, W): |F(X) - X| averaged over the channels.

  The paper's heatmap averages the per-channel reconstruction difference
  over the colour channels (and smooths it: `eval.map_sigma`).
  """
  return jnp.mean(jnp.abs(precision.widen(reconstructions) - images), axis=-1)


def min_defect_area(config: ml_collections.ConfigDict) -> int:
  """Bauer's minimum defect area of the category, in pixels at image_size."""
  fraction = config.eval.min_defect_fraction_by_category.get(
      config.category, config.eval.min_defect_fraction)
  return max(1, round(fraction * config.image_size ** 2))


class Bauer(base.Method):
  """Autoencoder with stacked dilated convolutions, trained on patch distortions."""

  name = 'bauer'
  stages = (1,)
  config_file = 'configs/bauer.py'
  config_rules = (
      ('model.encoder_widths', lambda v: len(v) > 0 and all(w > 0 for w in v),
       'a non-empty list of positive widths'),
      ('model.sdc_blocks', lambda v: v >= 0, '0 or more'),
      ('model.sdc_filters', lambda v: v > 0, 'positive'),
      ('model.sdc_dilations', lambda v: len(v) > 0 and all(d > 0 for d in v),
       'a non-empty list of positive dilations'),
      ('loss.objective', lambda v: v in losses.OBJECTIVES,
       ' or '.join(map(str, losses.OBJECTIVES))),
      ('loss.lam', lambda v: 0 <= v <= 1, 'in [0, 1]'),
      ('eval.min_defect_fraction', lambda v: 0 < v < 1, 'in (0, 1)'),
  ) + synthesis_rules.DISTORTION

  def config_problems(self, config: ml_collections.ConfigDict) -> list[str]:
    """The rules, and an image size the encoder's poolings divide."""
    problems = super().config_problems(config)
    multiple = 2 ** len(config.model.encoder_widths)
    if config.image_size % multiple:
      problems.append(
          f'config.image_size = {config.image_size} must be a multiple of {multiple} '
          f'(the encoder halves it {len(config.model.encoder_widths)} times)')
    return problems

  def create_model(self, config: ml_collections.ConfigDict, stage: int) -> nn.Module:
    del stage
    model = config.model
    return BauerAutoencoder(
        encoder_widths=tuple(model.encoder_widths),
        sdc_blocks=model.sdc_blocks,
        sdc_filters=model.sdc_filters,
        sdc_dilations=tuple(model.sdc_dilations),
        sdc_kernel=model.sdc_kernel,
        bn_momentum=model.bn_momentum,
        bn_epsilon=model.bn_epsilon,
        dtype=precision.compute_dtype(config))

  def objective(self, config: ml_collections.ConfigDict, stage: int) -> base.Objective:
    """The masked contrast objective `loss.objective` against the normal image ('target')."""
    del stage
    return lambda prediction, batch: losses.masked_contrast_loss(
        prediction, batch['target'], batch['image'], batch['mask'], config.loss)

  def sampler_factory(self, config: ml_collections.ConfigDict, stage: int,
                      images: np.ndarray) -> pipeline.SamplerFactory:
    del stage, images
    return functools.partial(synthesis.DistortionSampler, config)

  def map_names(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]
                ) -> tuple[str, ...]:
    del config, trained
    return (AUTOENCODER,)

  def maps_fn(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]) -> base.MapsFn:
    del trained
    model = self.create_model(config, 1)

    def maps(variables, batch):
      reconstructions = model.apply(variables[0], batch['image'], train=False)
      return {AUTOENCODER: reconstruction_error_map(reconstructions, batch['image'])}

    return maps

  def extra_results(self, config: ml_collections.ConfigDict, test_maps: np.ndarray,
                    test: Any, held_out_maps: np.ndarray | None) -> dict[str, Any]:
    """Bauer's protocol: TPR, TNR, their mean and F1s at the held-out minimum-area threshold."""
    if held_out_maps is None:
      return {}
    area = min_defect_area(config)
    threshold = area_protocol.area_threshold(held_out_maps, area)
    return {'area_protocol': area_protocol.evaluate_at_area_threshold(
        test_maps, test.masks, test.labels, threshold, area)}


METHOD = Bauer()
