"""Decision thresholds for prediction, fixed from held-out normal images.

A share of train/good (`calibration.holdout_fraction`) never reaches
training. After training, the final map of each held-out image is computed;
the image threshold is the `calibration.image_quantile` quantile of their
image scores and the pixel threshold the `calibration.pixel_quantile`
quantile of all their pixels. Only normal images are used, never the test
set, so the thresholds are an honest operating point: about
1 - image_quantile of normal images are flagged.

They are stored as `<workdir>/checkpoints/thresholds.json` together with
everything they were computed for (checkpoint steps, method, image size,
held-out split, refinement, smoothing and score rule, quantiles), and
recomputed when any of that changes.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from twostage_jax import data
from twostage_jax.inference import engine
from twostage_jax.workdir import atomic_write
from twostage_jax.workdir import paths


HeldOut = tuple[dict[str, np.ndarray], dict[str, np.ndarray]]  # maps and scores by map name
# Raised whenever the code gives other maps or scores for the same checkpoints
# and config (issue 23's reflected smoothing was such a change), so thresholds
# stored before it are recomputed instead of being taken as current.
MAPS_REVISION = 2


def compute_thresholds(config: ml_collections.ConfigDict, model: engine.TrainedModel,
                       held_out: HeldOut | None = None) -> dict[str, Any]:
  """Image and pixel thresholds of `model`'s final map on the held-out images.

  Args:
    config: the run's config.
    model: the trained model.
    held_out: the held-out images' maps and scores (`engine.maps_and_scores`)
      when already computed.

  Raises:
    ValueError: if `calibration.holdout_fraction` is 0 (nothing held out).
  """
  if config.calibration.holdout_fraction <= 0:
    raise ValueError(
        'decision thresholds need held-out normal images, but '
        'config.calibration.holdout_fraction is 0; retrain with a fraction > 0')
  if held_out is None:
    held_out = engine.maps_and_scores(config, model, data.training_images(config)[1])
  maps, scores = held_out
  final = model.final_map
  return {
      'image': float(np.quantile(scores[final], config.calibration.image_quantile)),
      'pixel': float(np.quantile(maps[final], config.calibration.pixel_quantile)),
      'num_holdout_images': len(maps[final]),
      **_computed_for(config, model),
  }


def _computed_for(config: ml_collections.ConfigDict,
                  model: engine.TrainedModel) -> dict[str, Any]:
  """Everything besides the weights that changes the held-out maps or scores."""
  return {
      'maps_revision': MAPS_REVISION,
      **model.steps,
      'map': model.final_map,
      'method': model.method.name,
      'image_size': config.image_size,
      'seed': config.seed,  # with the fraction, picks the held-out images
      'holdout_fraction': config.calibration.holdout_fraction,
      'image_quantile': config.calibration.image_quantile,
      'pixel_quantile': config.calibration.pixel_quantile,
      'map_sigma': config.eval.map_sigma,
      'score_rule': config.eval.score_rule,
      'score_filter_size': config.eval.score_filter_size,
      **{section: config[section].to_dict()
         for section in model.method.inference_sections},
  }


def _is_current(thresholds: dict[str, Any], config: ml_collections.ConfigDict,
                model: engine.TrainedModel) -> bool:
  return all(thresholds.get(k) == v for k, v in _computed_for(config, model).items())


def ensure_thresholds(config: ml_collections.ConfigDict, workdir: str,
                      model: engine.TrainedModel,
                      held_out: HeldOut | None = None) -> dict[str, Any]:
  """The stored thresholds of `model`'s checkpoints; computed and stored if missing.

  `held_out`: the held-out images' maps and scores, when already computed.
  """
  path = paths.thresholds_file(workdir)
  if os.path.exists(path):
    try:
      with open(path, encoding='utf-8') as f:
        stored = json.load(f)
      if not isinstance(stored, dict):
        raise ValueError(f'holds a JSON {type(stored).__name__}, not an object')
    except ValueError as error:  # also JSONDecodeError, UnicodeDecodeError
      # An interrupted or hand-edited file must not block prediction.
      logging.warning('ignoring unusable thresholds file %s (%s); recomputing',
                      path, error)
    else:
      if _is_current(stored, config, model):
        return stored
  thresholds = compute_thresholds(config, model, held_out)
  logging.info('decision thresholds from %d held-out normal images: image %.4g, pixel %.4g',
               thresholds['num_holdout_images'], thresholds['image'], thresholds['pixel'])
  if jax.process_index() == 0:
    atomic_write.write_json(path, thresholds)
  return thresholds
