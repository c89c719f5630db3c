"""The two-stage coarse-to-fine model as a method.

Stage 1 learns the pseudo-anomaly masks from the images; stage 2 is the same
network and step, trained on stage 1's refined input (refine.py) with stage
1 frozen. At inference the refinement keeps the SLIC superpixels stage 1
flagged, stage 2 maps that masked image and the final map combines both.
SLIC runs on the host in worker processes (`refine.superpixels='host'`), or
on the device inside the compiled step and maps ('device').
"""

import functools
import os
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from twostage_jax import data
from twostage_jax import losses
from twostage_jax import synthesis
from twostage_jax.methods import base
from twostage_jax.methods import synthesis_rules
from twostage_jax.methods.two_stage import device_slic
from twostage_jax.methods.two_stage import host_refine
from twostage_jax.methods.two_stage import host_slic
from twostage_jax.methods.two_stage import refine
from twostage_jax.methods.two_stage.model import SegmentationNet
from twostage_jax.models import layers
from twostage_jax.runtime import pipeline
from twostage_jax.training import precision

STAGE1, STAGE2, COMBINED = 'stage 1', 'stage 2', 'combined'
# The names of the stage-1 map and the refined region between the parts of the maps.
_STAGE1_KEY, _REGION_KEY = 'stage1', 'region'
# What the host refinement reads of `refine` (host_refine.py).
_HOST_REFINE_KEYS = ('threshold_rule', 'threshold', 'tasad_th_pix', 'tasad_th_val',
                     'median_size', 'n_segments', 'compactness', 'sigma')
SUPERPIXELS = ('host', 'device')  # where the refinement's SLIC runs


def _on_device(config: ml_collections.ConfigDict) -> bool:
  return config.refine.superpixels == 'device'


def device_labels(images: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """int32 (B, H, W) SLIC labels of float (B, H, W, 3) images in [0, 1], on the device."""
  refine_config = config.refine
  return device_slic.slic_labels(images, refine_config.n_segments, refine_config.compactness,
                                 refine_config.sigma,
                                 enforce_connectivity=refine_config.connectivity)


def stage_loss(config: ml_collections.ConfigDict, stage: int) -> ml_collections.ConfigDict:
  """The loss settings of `stage`.

  Stage 1 uses `loss`; stage 2 uses `loss` with every key that
  `stage2.loss` sets (not None) replaced.
  """
  if stage == 1:
    return config.loss
  merged = config.loss.copy_and_resolve_references()
  for key, value in config.stage2.loss.items():
    if value is not None:
      merged[key] = value
  return merged


def stage_synthesis(config: ml_collections.ConfigDict, stage: int
                    ) -> ml_collections.ConfigDict:
  """The synthesis settings of `stage`: stage 2 with `stage2.p_self_source` if set."""
  if stage == 1 or config.stage2.p_self_source is None:
    return config.synthesis
  merged = config.synthesis.copy_and_resolve_references()
  merged.p_self_source = config.stage2.p_self_source
  return merged


def _store_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """SAIM's SLIC settings and where stores live; all cores build a missing one."""
  return {'n_segments': config.synthesis.saim_n_segments,
          'compactness': config.synthesis.saim_compactness,
          'sigma': config.synthesis.saim_sigma,
          'cache_dir': data.default_cache_dir(config.cache_dir),
          'num_processes': os.cpu_count() or 1}


def anomaly_sources(config: ml_collections.ConfigDict) -> synthesis.SourceStore:
  """The memory-mapped store of the anomaly sources and their SLIC labels.

  Built on the first run on a machine and reused by later runs with the
  same sources and settings.
  """
  logging.info('anomaly sources: %s', synthesis.describe_sources(config.anomaly_source_dir))
  return synthesis.build_source_store(config.anomaly_source_dir, config.image_size,
                                      **_store_settings(config))


class TwoStage(base.Method):
  """Segmentation net, SSIM + L2 against pseudo-anomaly masks, SLIC refinement."""

  name = 'two_stage'
  stages = (1, 2)
  config_file = 'configs/mvtec.py'
  inference_sections = ('refine',)
  # Where the refinement's SLIC runs: the same algorithm on host or device.
  per_run_keys = ('refine.superpixels',)
  config_rules = (
      ('model.width', lambda v: v > 0, 'positive'),
      ('model.init', lambda v: v in layers.INITS, ' or '.join(map(repr, layers.INITS))),
      ('model.init_std', lambda v: v > 0, 'positive'),
      ('refine.threshold_rule', lambda v: v in refine.THRESHOLD_RULES,
       ' or '.join(map(repr, refine.THRESHOLD_RULES))),
      ('refine.tasad_th_pix', lambda v: 0 < v <= 1, 'in (0, 1]'),
      ('refine.tasad_th_val', lambda v: 0 <= v < 255, 'in [0, 255)'),
      ('refine.train_rule', lambda v: v in refine.TRAIN_RULES,
       ' or '.join(map(repr, refine.TRAIN_RULES))),
      ('refine.train_tasad_th_pix', lambda v: 0 < v <= 1, 'in (0, 1]'),
      ('refine.train_tasad_th_val', lambda v: 0 <= v < 255, 'in [0, 255)'),
      ('refine.median_size', lambda v: v > 0 and v % 2 == 1, 'a positive odd number'),
      ('refine.n_segments', lambda v: v > 1, 'more than 1'),
      ('refine.compactness', lambda v: v > 0, 'positive'),
      ('refine.sigma', lambda v: v >= 0, '0 or more'),
      ('refine.superpixels', lambda v: v in SUPERPIXELS, ' or '.join(map(repr, SUPERPIXELS))),
      ('refine.combine', lambda v: v in refine.COMBINE_RULES,
       ' or '.join(map(repr, refine.COMBINE_RULES))),
      ('stage2.num_steps', lambda v: v is None or v > 0, 'positive, or None (= train.num_steps)'),
      ('stage2.p_self_source', lambda v: v is None or 0 <= v <= 1,
       'a probability in [0, 1], or None (= synthesis.p_self_source)'),
      ('stage2.loss.l2_weight', lambda v: v is None or v >= 0,
       '0 or more, or None (= loss.l2_weight)'),
      ('stage2.loss.ssim_weight', lambda v: v is None or v >= 0,
       '0 or more, or None (= loss.ssim_weight)'),
  ) + synthesis_rules.SYNTHESIS + synthesis_rules.DISTORTION

  def config_problems(self, config: ml_collections.ConfigDict) -> list[str]:
    return super().config_problems(config) + synthesis_rules.recipe_problems(config)

  def create_model(self, config: ml_collections.ConfigDict, stage: int) -> nn.Module:
    del stage  # both stages use the same network
    model = config.model
    return SegmentationNet(width=model.width, bn_momentum=model.bn_momentum,
                           bn_epsilon=model.bn_epsilon, dtype=precision.compute_dtype(config),
                           weight_init=model.init, weight_init_std=model.init_std)

  def objective(self, config: ml_collections.ConfigDict, stage: int) -> base.Objective:
    loss_config = stage_loss(config, stage)
    return lambda prediction, batch: losses.ssim_l2_loss(prediction, batch['mask'], loss_config)

  def sampler_factory(self, config: ml_collections.ConfigDict, stage: int,
                      images: np.ndarray) -> pipeline.SamplerFactory:
    """Carries the source stores by their folders, so every worker maps the same files.

    `images` become self sources when the stage's p_self_source
    (`stage_synthesis`) is > 0.
    """
    config = config.copy_and_resolve_references()
    config.synthesis = stage_synthesis(config, stage)
    self_sources = None
    if config.synthesis.p_self_source > 0:
      self_sources = synthesis.build_image_store(images, f'{config.category}-train',
                                                 **_store_settings(config))
    return functools.partial(synthesis.PseudoAnomalySampler, anomaly_sources(config), config,
                             stage, self_sources, with_labels=stage == 2 and not _on_device(config))

  def frozen_stages(self, stage: int) -> tuple[int, ...]:
    return (1,) if stage == 2 else ()

  def stage_batch(self, config: ml_collections.ConfigDict, stage: int
                  ) -> base.StageBatchFn | None:
    if stage != 2:
      return None
    stage1_apply = self.create_model(config, 1).apply

    def to_stage2(frozen, batch):
      if _on_device(config):
        batch = {**batch, 'labels': device_labels(batch['image'], config)}
      return refine.stage2_batch(stage1_apply, frozen[0], batch, config=config.refine)

    return to_stage2

  def map_names(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]
                ) -> tuple[str, ...]:
    del config
    return (STAGE1, STAGE2, COMBINED) if 2 in trained else (STAGE1,)

  def maps_fn(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]) -> base.MapsFn:
    """Stage 1's map; with stage 2 also its map of the refined input and the combination."""
    model = self.create_model(config, 1)
    if 2 not in trained:
      return lambda variables, batch: {STAGE1: model.apply(variables[0], batch['image'],
                                                           train=False)}
    split = self.host_split(config, trained)

    def maps(variables, batch):
      images = batch['image']
      first = split.before(variables, batch)
      labels = device_labels(images, config) if _on_device(config) else batch['labels']
      selected = refine.region(first[_STAGE1_KEY], labels, config.refine)
      return split.after(variables, {**batch, **first, _REGION_KEY: selected})

    return maps

  def host_split(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]
                 ) -> base.HostSplit | None:
    """Stage 1's map; on the host the region (host_refine.py); stage 2 and the combination."""
    if 2 not in trained:
      return None
    model = self.create_model(config, 1)

    def before(variables, batch):
      return {_STAGE1_KEY: model.apply(variables[0], batch['image'], train=False)}

    def after(variables, batch):
      selected = batch[_REGION_KEY] > 0.5
      stage2 = model.apply(variables[1], refine.masked_input(batch['image'], selected),
                           train=False)
      return self.combine(config, {STAGE1: batch[_STAGE1_KEY], STAGE2: stage2})

    size = config.image_size
    return base.HostSplit(before, {key: config.refine[key] for key in _HOST_REFINE_KEYS},
                          {_REGION_KEY: ((size, size), np.float32)}, after)

  def host_step(self, settings: dict[str, Any]) -> base.HostStep:
    return lambda images, first: {
        _REGION_KEY: host_refine.region(images, first[_STAGE1_KEY], settings)}

  def combine(self, config: ml_collections.ConfigDict, maps: dict[str, jax.Array]
              ) -> dict[str, jax.Array]:
    """With stage 2, the combined map of both stages by `refine.combine`."""
    if STAGE2 not in maps:
      return maps
    return {**maps, COMBINED: refine.combine(maps[STAGE1], maps[STAGE2], config.refine.combine)}

  def pure_config(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the refinement's SLIC on the device."""
    if _on_device(config):
      return config
    config = config.copy_and_resolve_references()
    config.refine.superpixels = 'device'
    return config

  def host_inputs(self, config: ml_collections.ConfigDict, trained: tuple[int, ...],
                  images: np.ndarray, batch_size: int, num_workers: int
                  ) -> Iterator[dict[str, np.ndarray]]:
    """The SLIC labels the refinement needs, computed ahead in worker processes."""
    if 2 not in trained or _on_device(config):
      yield from super().host_inputs(config, trained, images, batch_size, num_workers)
      return
    for labels in host_slic.superpixel_batches(images, config, batch_size, num_workers):
      yield {'labels': labels}


METHOD = TwoStage()
