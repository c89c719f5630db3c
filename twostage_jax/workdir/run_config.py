"""A workdir keeps the config it was trained with; later commands use it.

Without this, `--mode=evaluate` without data flags would evaluate the demo's
data, and `--config.category=grid` on a bottle workdir would "resume" the
bottle model as grid. So the first training writes `<workdir>/config.json`,
and every later command on that workdir runs with the saved config:

- values the config file (`--config=configs/x.py`) merely defaults never
  replace saved ones, whichever file is given;
- an explicit `--config.key=value` that differs from the saved value is
  refused, naming every such key, unless the key is in `PER_RUN_KEYS`
  (settings that cannot change what was learned); those apply to this
  command only, and config.json keeps the training value.

Workdirs trained before config.json existed use the config stored in their
newest checkpoint.
"""

import copy
import fnmatch
import glob
import json
import os
from typing import Any, Callable

import ml_collections
from absl import logging
from ml_collections import config_flags

from twostage_jax.workdir import atomic_write
from twostage_jax.workdir import checkpoints as checkpoints_lib
from twostage_jax.workdir import paths

# Settings an existing workdir's command may change: which stages it trains
# (stage 2 on a workdir whose stage 1 was trained alone), how a run logs, feeds
# and compiles, which checkpoints it evaluates, how it scores and thresholds,
# where it predicts and what it exports for. A key covers the keys below it;
# '*' stands for any characters (eval.stage*_step: every stage's).
# A method adds its own (`Method.per_run_keys`).
PER_RUN_KEYS = (
    'stage',
    'train.log_every',
    'train.num_workers',
    'train.prefetch_batches',
    'train.device_prefetch',
    'train.keep_checkpoints',
    'train.tensorboard',
    'train.tensorboard_images',
    'eval.batch_size',
    'eval.num_examples',
    'eval.stage*_step',
    'eval.score_rule',
    'eval.image_score',
    'eval.score_filter_size',
    'eval.map_sigma',
    'calibration.image_quantile',
    'calibration.pixel_quantile',
    'predict_dir',
    'predict_output_dir',
    'distributed',
    'xla_cpu_options',
    'export',
)

_MISSING = object()


class ConfigMismatch(ValueError):
  """Command-line values contradict the config a workdir was trained with."""


def explicit_overrides(config_flag: Any) -> dict[str, Any]:
  """{dotted key: value} of the `--config.key=value` flags given.

  Args:
    config_flag: the parsed flag of `config_flags.DEFINE_config_file`, e.g.
      `flags.FLAGS['config']`.
  """
  return dict(config_flags.get_override_values(config_flag))


def _covered(key: str, prefixes: Any) -> bool:
  """Whether dotted `key` matches one of `prefixes` (fnmatch patterns) or lies below one."""
  return any(fnmatch.fnmatchcase(key, k) or key.startswith(k + '.') for k in prefixes)


def is_per_run(key: str, method_keys: tuple[str, ...] = ()) -> bool:
  """Whether `key` may differ from the saved config (PER_RUN_KEYS and the method's keys)."""
  return _covered(key, PER_RUN_KEYS + tuple(method_keys))


def _plain(value: Any) -> Any:
  """`value` as JSON holds it: tuples as lists, ConfigDicts as dicts."""
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return json.loads(json.dumps(value))


def _tuples(value: Any) -> Any:
  """`value` with JSON's lists back as tuples, the configs' sequence type."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def _leaves(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """{dotted key: value} of every leaf of `tree`; an empty dict is a leaf."""
  leaves = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      leaves.update(_leaves(value, f'{prefix}{key}.'))
    else:
      leaves[f'{prefix}{key}'] = value
  return leaves


def _get(tree: dict[str, Any], key: str) -> Any:
  for part in key.split('.'):
    if not isinstance(tree, dict) or part not in tree:
      return _MISSING
    tree = tree[part]
  return tree


def _set(tree: dict[str, Any], key: str, value: Any) -> None:
  *parents, name = key.split('.')
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[name] = value


def _checkpoint_config(workdir: str) -> tuple[dict[str, Any], str] | None:
  """The config stored in the workdir's newest readable checkpoint, and its folder."""
  newest = None
  for directory in sorted(glob.glob(os.path.join(paths.checkpoints_dir(workdir), '*', ''))):
    checkpoints = checkpoints_lib.Checkpoints(directory, read_only=True)
    try:
      for step in sorted(checkpoints.all_steps(), reverse=True):
        try:
          stored = checkpoints.config(step)
        except checkpoints_lib.DamagedCheckpointError as error:
          logging.warning('%s', error)
          continue
        folder = checkpoints.step_dir(step)
        modified = os.path.getmtime(folder)
        if newest is None or modified > newest[0]:
          newest = (modified, stored, folder)
        break
    finally:
      checkpoints.close()
  return None if newest is None else (newest[1], newest[2])


def saved_config(workdir: str) -> tuple[dict[str, Any], str] | None:
  """The config `workdir` was trained with, and the file or folder it came from.

  None for a new workdir: no config.json and no checkpoint holding a config.
  """
  path = paths.config_file(workdir)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      try:
        return json.load(f), path
      except ValueError as error:
        raise ConfigMismatch(f'cannot read the saved config {path}: {error}') from error
  return _checkpoint_config(workdir)


def _fill_missing(saved: dict[str, Any], defaults: dict[str, Any], prefix: str = '') -> list[str]:
  """Adds to `saved` the keys it lacks from `defaults`; returns them (dotted).

  A saved empty dict is a mapping that had no entries (e.g. no XLA options),
  not one whose keys are missing, so nothing is added below it.
  """
  added = []
  for key, value in defaults.items():
    if key not in saved:
      saved[key] = copy.deepcopy(value)
      added.append(prefix + key)
    elif isinstance(value, dict) and isinstance(saved[key], dict) and saved[key]:
      added += _fill_missing(saved[key], value, f'{prefix}{key}.')
  return added


def _completed(saved: dict[str, Any], file_config: ml_collections.ConfigDict,
               source: str) -> dict[str, Any]:
  """`saved` with the keys it lacks taken from the config file.

  A saved config from an older version of the code lacks the keys added
  since; the file's values for them are the code's defaults. A file of
  another method has nothing to add.
  """
  completed = copy.deepcopy(saved)
  if file_config.get('method') != saved.get('method'):
    logging.warning('the config file is for method %r but the workdir was trained with '
                    '%r (%s); the saved config is used', file_config.get('method'),
                    saved.get('method'), source)
    return completed
  added = _fill_missing(completed, _plain(file_config))
  if added:
    logging.info('keys missing from the saved config %s take the config file\'s values: %s',
                 source, ', '.join(added))
  return completed


def resolve(file_config: ml_collections.ConfigDict, overrides: dict[str, Any],
            workdir: str, method_keys: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
  """The config of a command on `workdir`.

  Args:
    file_config: the config file's config with the command line's overrides
      applied (what `config_flags` parses into `FLAGS.config`).
    overrides: the explicit `--config.key=value` values, by dotted key
      (`explicit_overrides`).
    workdir: the run's folder.
    method_keys: the per-run keys of the run's method (`Method.per_run_keys`).

  Returns:
    `file_config` for a new workdir; otherwise the saved config with the
    allowed overrides applied. Locked, like a config from config_flags.

  Raises:
    ConfigMismatch: an override differs from the saved value of a key
      outside PER_RUN_KEYS (or names a key the saved config lacks); the
      message names every such key with both values.
  """
  saved = saved_config(workdir)
  if saved is None:
    return file_config
  saved_tree, source = saved
  run = _completed(saved_tree, file_config, source)
  refused = []
  for key, value in overrides.items():
    given, stored = _plain(value), _get(run, key)
    if is_per_run(key, method_keys) or given == stored:
      _set(run, key, given)
    elif stored is _MISSING:
      refused.append(f'--config.{key}: not in the saved config, given {json.dumps(given)}')
    else:
      refused.append(f'--config.{key}: saved {json.dumps(stored)}, given {json.dumps(given)}')
  if refused:
    raise ConfigMismatch(
        f'workdir {os.path.abspath(workdir)} was trained with the config in {source}; '
        'these command-line values would change it:\n  ' + '\n  '.join(refused) +
        '\nDrop them, or start a new run in another --workdir. Settings that may change '
        f'on a trained workdir: {", ".join(PER_RUN_KEYS + tuple(method_keys))}.')
  differing = sorted(
      key for key, value in _leaves(_plain(file_config)).items()
      if _get(run, key) not in (_MISSING, value) and not _covered(key, overrides))
  logging.info('workdir %s: using the config it was trained with (%s)%s', workdir, source,
               f'; the config file\'s {", ".join(differing)} are not used' if differing else '')
  return _locked(run)


def _locked(tree: dict[str, Any]) -> ml_collections.ConfigDict:
  """A locked ConfigDict of a JSON config, sequences as tuples as in the config files."""
  config = ml_collections.ConfigDict(_tuples(tree))
  config.lock()
  return config


def load(workdir: str,
         file_config_of: Callable[[str], ml_collections.ConfigDict | None] | None = None
         ) -> ml_collections.ConfigDict | None:
  """The config `workdir` was trained with (see saved_config); None for a new workdir.

  With `file_config_of` (a method's name -> its config file's config, or
  None), keys added to the code since the run was trained take that file's
  values, as in a command on the workdir.
  """
  saved = saved_config(workdir)
  if saved is None:
    return None
  tree, source = saved
  file_config = None if file_config_of is None else file_config_of(tree.get('method'))
  return _locked(tree if file_config is None else _completed(tree, file_config, source))


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records the workdir's training config as config.json, once.

  Called at the start of every training (on process 0 only): the first
  writes it; later ones leave it alone, so values allowed to change for one
  command (PER_RUN_KEYS) never become the saved ones. A workdir trained
  before config.json existed records its newest checkpoint's config, with
  the keys it lacks taken from `config`.
  """
  path = paths.config_file(workdir)
  if os.path.exists(path):
    return
  legacy = _checkpoint_config(workdir)
  value = _plain(config)
  if legacy is not None:
    value = _completed(legacy[0], config, legacy[1])
  atomic_write.write_json(path, value)
