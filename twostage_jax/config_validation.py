"""Checks a run's config before any work starts, naming the offending key."""

import jax
import ml_collections

from twostage_jax import data
from twostage_jax import methods
from twostage_jax.methods import base
from twostage_jax.training import precision

# (key, predicate, what the value must be), for every method; each method
# adds its own (methods/).
_RULES: tuple[base.Rule, ...] = (
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
    ('train.tensorboard_images', lambda v: v >= 0, '0 or more'),
    ('augment.rotations', lambda v: len(v) > 0 and all(a % 90 == 0 for a in v),
     'a non-empty list of multiples of 90'),
    ('calibration.holdout_fraction', lambda v: 0 <= v < 1, 'in [0, 1)'),
    ('calibration.image_quantile', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('calibration.pixel_quantile', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('model.compute_dtype',
     lambda v: v == 'auto' or (v in precision.COMPUTE_DTYPES
                               and (v != 'float64' or jax.config.jax_enable_x64)),
     "'auto', 'float32', 'bfloat16' or 'float64' (float64 only with JAX_ENABLE_X64=1)"),
    ('eval.batch_size', lambda v: v > 0, 'positive'),
    ('eval.num_examples', lambda v: v >= 0, '0 or more'),
    ('eval.score_filter_size', lambda v: v > 0 and v % 2 == 1, 'a positive odd number'),
    ('eval.score_rule', lambda v: v in ('mean_filter_max', 'max'), "'mean_filter_max' or 'max'"),
    ('eval.map_sigma', lambda v: v >= 0, '0 or more'),
    ('export.format', lambda v: v in ('stablehlo', 'onnx'), "'stablehlo' or 'onnx'"),
)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError listing every config value outside its valid range.

  An unknown `method` is reported alone, naming the known ones; a config
  written for another method (it lacks the method's keys) names the config
  to start from.
  """
  method = methods.get(config.method)
  problems = base.rule_problems(config, _RULES)
  stages = ('both',) + tuple(map(str, method.stages))
  if config.stage not in stages:
    problems.append(f'config.stage = {config.stage!r} must be '
                    f"{' or '.join(map(repr, stages))} for method {method.name!r}")
  try:
    problems += method.config_problems(config)
  except KeyError as error:
    start = (f'--config={method.config_file}' if method.config_file
             else f"the config of method {method.name!r}")
    raise ValueError(
        f'config.method = {method.name!r}, but the config lacks its key {error.args[0]}: it '
        f'was written for another method; start from {start}') from error
  if problems:
    raise ValueError('invalid config:\n  ' + '\n  '.join(problems))
