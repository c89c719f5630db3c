"""Checks a run's config before any work starts, naming the offending key."""

from typing import Any, Callable

import ml_collections

from twostage_jax import data
from twostage_jax import refine
from twostage_jax import train

METHODS = ('two_stage', 'bauer')

# (key, predicate, what the value must be), for every method.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ('method', lambda v: v in METHODS, "'two_stage' or 'bauer'"),
    ('image_size', lambda v: v > 0 and v % 4 == 0, 'a positive multiple of 4'),
    ('data_cache', lambda v: v in data.DATA_CACHES, "'tfds' or 'none'"),
    ('train.global_batch_size', lambda v: v > 0, 'positive'),
    ('train.num_steps', lambda v: v > 0, 'positive'),
    ('train.learning_rate', lambda v: v > 0, 'positive'),
    ('train.lr_decay_fractions', lambda v: all(0 < f < 1 for f in v), 'fractions in (0, 1)'),
    ('train.num_workers', lambda v: v >= 0, '0 (main process) or more'),
    ('train.prefetch_batches', lambda v: v >= 1, 'at least 1'),
    ('train.device_prefetch', lambda v: v >= 1, 'at least 1'),
    ('train.log_every', lambda v: v > 0, 'positive'),
    ('train.checkpoint_every', lambda v: v > 0, 'positive'),
    ('train.keep_checkpoints', lambda v: v > 0, 'positive'),
    ('synthesis.p_anomaly', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('synthesis.p_perlin', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('synthesis.beta_max', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('synthesis.perlin_max_exponent', lambda v: v >= 0, '0 or more'),
    ('synthesis.num_augmenters', lambda v: 0 <= v <= 10, 'between 0 and 10'),
    ('synthesis.saim_fraction', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('synthesis.saim_n_segments', lambda v: len(v) > 0 and all(n > 1 for n in v),
     'a non-empty list of segment counts > 1'),
    ('synthesis.p_distortion', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('synthesis.p_self_source', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('distortion.p_distort', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('distortion.patch_min_fraction', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('distortion.patch_max_fraction', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('distortion.shape_threshold', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('augment.rotations', lambda v: len(v) > 0 and all(a % 90 == 0 for a in v),
     'a non-empty list of multiples of 90'),
    ('calibration.holdout_fraction', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('calibration.image_quantile', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('calibration.pixel_quantile', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('model.compute_dtype', lambda v: v == 'auto' or v in train.COMPUTE_DTYPES,
     "'auto', 'float32' or 'bfloat16'"),
    ('eval.batch_size', lambda v: v > 0, 'positive'),
    ('eval.num_examples', lambda v: v >= 0, '0 or more'),
    ('eval.score_filter_size', lambda v: v > 0 and v % 2 == 1, 'a positive odd number'),
    ('eval.score_rule', lambda v: v in ('mean_filter_max', 'max'), "'mean_filter_max' or 'max'"),
    ('eval.map_sigma', lambda v: v >= 0, '0 or more'),
)

_METHOD_RULES: dict[str, tuple[tuple[str, Callable[[Any], bool], str], ...]] = {
    'two_stage': (
        ('model.width', lambda v: v > 0, 'positive'),
        ('stage', lambda v: v in ('both', '1', '2'), "'both', '1' or '2'"),
        ('refine.threshold_rule', lambda v: v in refine.THRESHOLD_RULES,
         ' or '.join(map(repr, refine.THRESHOLD_RULES))),
        ('refine.tasad_th_pix', lambda v: 0 < v <= 1, 'in (0, 1]'),
        ('refine.tasad_th_val', lambda v: 0 <= v < 255, 'in [0, 255)'),
        ('refine.median_size', lambda v: v > 0 and v % 2 == 1, 'a positive odd number'),
        ('refine.n_segments', lambda v: v > 1, 'more than 1'),
        ('refine.compactness', lambda v: v > 0, 'positive'),
        ('refine.sigma', lambda v: v >= 0, '0 or more'),
        ('refine.combine', lambda v: v in refine.COMBINE_RULES,
         "'sum', 'mean', 'max' or 'stage2'"),
        ('stage2.num_steps', lambda v: v is None or v > 0, 'positive, or None (= train.num_steps)'),
        ('stage2.loss.l2_weight', lambda v: v is None or v >= 0,
         '0 or more, or None (= loss.l2_weight)'),
        ('stage2.loss.ssim_weight', lambda v: v is None or v >= 0,
         '0 or more, or None (= loss.ssim_weight)'),
    ),
    'bauer': (
        ('stage', lambda v: v == '1', "'1' (Bauer's model is a single network)"),
        ('model.encoder_widths', lambda v: len(v) > 0 and all(w > 0 for w in v),
         'a non-empty list of positive widths'),
        ('model.sdc_blocks', lambda v: v >= 0, '0 or more'),
        ('model.sdc_filters', lambda v: v > 0, 'positive'),
        ('model.sdc_dilations', lambda v: len(v) > 0 and all(d > 0 for d in v),
         'a non-empty list of positive dilations'),
        ('loss.objective', lambda v: v in (1, 3), '1 or 3'),
        ('loss.lam', lambda v: 0 <= v <= 1, 'in [0, 1]'),
        ('eval.min_defect_fraction', lambda v: 0 < v < 1, 'in (0, 1)'),
    ),
}


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  value = config
  for part in key.split('.'):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing every config value outside its valid range."""
  problems = []
  rules = _RULES + _METHOD_RULES.get(config.method, ())
  for key, valid, expected in rules:
    value = _get(config, key)
    if not valid(value):
      problems.append(f'config.{key} = {value!r} must be {expected}')
  if problems:
    raise ValueError('invalid config:\n  ' + '\n  '.join(problems))
