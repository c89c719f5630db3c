"""The program behind main.py: flags, the run's config, the modes, all categories.

It lives in the package so that main.py stays import-free: the input
pipeline's spawned workers re-import main.py, and must not import JAX.
"""

import json
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from twostage_jax import config_validation
from twostage_jax import data
from twostage_jax import methods
from twostage_jax.evaluation import evaluate
from twostage_jax.evaluation import report
from twostage_jax.inference import detector
from twostage_jax.inference import engine
from twostage_jax.inference import predict
from twostage_jax.runtime import parallel
from twostage_jax.runtime import pipeline
from twostage_jax.training import train
from twostage_jax.training import train_state
from twostage_jax.workdir import atomic_write
from twostage_jax.workdir import checkpoints
from twostage_jax.workdir import lock as workdir_lock
from twostage_jax.workdir import paths
from twostage_jax.workdir import run_config

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file; override values with --config.key=value.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics, reports and predictions.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict', 'export'],
                  'train: train the stages of config.stage (or resume), then evaluate; '
                  'evaluate: evaluate the checkpoints; predict: score config.predict_dir; '
                  'export: write the compiled detector to <workdir>/export.')
flags.mark_flags_as_required(['config', 'workdir'])

ALL_CATEGORIES = 'all'
# Problems with the user's files, config or workdir: their messages name them,
# so they end the program with one line instead of a traceback.
USER_ERRORS = (data.DatasetError, FileNotFoundError, checkpoints.DamagedCheckpointError,
               run_config.ConfigMismatch, workdir_lock.WorkdirLocked, pipeline.WorkerDied,
               parallel.BatchSizeError)


def run_category(config: ml_collections.ConfigDict, workdir: str, mode: str) -> dict | None:
  """Runs `mode` for one category in `workdir`; returns its evaluation results."""
  if mode == 'predict':
    predict.predict(config, workdir)
    return None
  if mode == 'export':
    logging.info('exported the detector to %s', detector.export(config, workdir))
    return None
  if mode == 'train':
    # Before hours of training, not after, and before the config is saved.
    parallel.local_batch_size(config.train.global_batch_size)
    data.check_test_split(config)
    method = methods.get(config.method)
    new_run = run_config.load(workdir) is None
    if jax.process_index() == 0:
      run_config.save(config, workdir)
      _save_data_contents(config, workdir)
    try:
      for stage in train.stages_to_train(method, config):
        train.train(method, config, workdir, stage)
    except BaseException:
      if (new_run and jax.process_index() == 0
          and not any(train_state.has_checkpoint(workdir, s) for s in method.stages)):
        _unpin(workdir)  # nothing was learned: the corrected command starts afresh
      raise
  return evaluate.evaluate(config, workdir, engine.load_model(config, workdir))


def _save_data_contents(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Records what the training data holds, once, so the data may move later."""
  path = paths.data_contents_file(workdir)
  if config.data_dir and not os.path.exists(path):
    atomic_write.write_json(path, {'category': config.category,
                                   'files': data.category_contents(config.data_dir,
                                                                   config.category)})


def _unpin(workdir: str) -> None:
  """Forgets the config and data a run that stopped before its first checkpoint saved."""
  for path in (paths.config_file(workdir), paths.data_contents_file(workdir)):
    if os.path.exists(path):
      os.remove(path)


def _moved_data(overrides: dict, workdir: str) -> bool:
  """Whether the command points a trained workdir at its own data in another place.

  Raises:
    ConfigMismatch: naming the files that differ, if the new place holds other data.
  """
  saved = run_config.load(workdir)
  new = overrides.get('data_dir')
  path = paths.data_contents_file(workdir)
  if saved is None or not new or new == saved.data_dir or not os.path.exists(path):
    return False
  try:
    with open(path, encoding='utf-8') as f:
      stored = json.load(f)
    category, files = stored['category'], stored['files']
  except (json.JSONDecodeError, KeyError, TypeError) as error:
    raise run_config.ConfigMismatch(
        f'--config.data_dir={new}: {path}, the record of the data workdir '
        f'{os.path.abspath(workdir)} was trained on, is damaged ({error!r}), so it cannot tell '
        f'whether {new} holds the same data; point --config.data_dir at {saved.data_dir}, '
        'where it was trained') from error
  found = data.category_contents(new, category)
  differences = data.content_differences(files, found)
  if differences:
    raise run_config.ConfigMismatch(
        f'--config.data_dir={new}: workdir {os.path.abspath(workdir)} was trained on '
        f'{saved.data_dir}, and {category} there is not the data it learned '
        'from:\n  ' + '\n  '.join(differences))
  logging.info('data_dir %s holds the files %s was trained on (moved from %s)', new, workdir,
               saved.data_dir)
  return True


def categories_of(config: ml_collections.ConfigDict) -> list[str]:
  """Every category under config.data_dir (the demo's when it is '')."""
  if not config.data_dir:
    return list(data.DEMO_CATEGORIES)
  return data.list_categories(config.data_dir)


def run_all_categories(config: ml_collections.ConfigDict, workdir: str, mode: str,
                       overrides: dict | None = None) -> None:
  """One model per category in `<workdir>/<category>`, then a summary with the mean.

  Each category's run has its own saved config; `overrides` are the
  explicit command-line values checked against it.
  """
  if mode in ('predict', 'export'):
    raise app.UsageError(f'--mode={mode} uses one trained category; set --config.category '
                         'and point --workdir at that category\'s run')
  categories = categories_of(config)
  logging.info('%s on %d categories: %s', mode, len(categories), ', '.join(categories))
  results = []
  for category in categories:
    category_config = config.copy_and_resolve_references()
    category_config.category = category
    category_workdir = paths.category_workdir(workdir, category)
    category_overrides = {k: v for k, v in (overrides or {}).items() if k != 'category'}
    category_config = _checked_run_config(category_config, category_overrides,
                                          category_workdir)
    with _lock(category_workdir):
      results.append(run_category(category_config, category_workdir, mode))
  if jax.process_index() == 0:
    out_dir = paths.eval_dir(workdir)
    atomic_write.write_json(os.path.join(out_dir, 'summary.json'), results)
    figures = {f'{r["category"]}: test images': f'../{r["category"]}/eval/examples.png'
               for r in results if config.eval.num_examples > 0}
    atomic_write.write_text(os.path.join(out_dir, 'report.md'),
                            report.markdown_report(results, 'Evaluation: all categories', figures))
  print(report.format_table(results), flush=True)


def _checked_run_config(config: ml_collections.ConfigDict, overrides: dict,
                        workdir: str) -> ml_collections.ConfigDict:
  """The run's config in `workdir` (its saved one, if any) with `overrides`, validated."""
  if config.method not in methods.names():
    _validated(config)  # names the unknown method beside every other problem
  per_run_keys = methods.get(config.method).per_run_keys
  if _moved_data(overrides, workdir):
    per_run_keys += ('data_dir',)
  return _validated(run_config.resolve(config, overrides, workdir, per_run_keys))


def _validated(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config`, if valid; an invalid one is a user error listing every bad value."""
  try:
    config_validation.validate(config)
  except ValueError as error:
    raise run_config.ConfigMismatch(str(error)) from error
  return config


def _lock(workdir: str) -> workdir_lock.WorkdirLock:
  """The workdir's lock, shared by the processes of this run (one id for all)."""
  run_id = int(multihost_utils.broadcast_one_to_all(
      np.int64(np.random.default_rng().integers(2 ** 62))))
  return workdir_lock.WorkdirLock(workdir, run_id=f'{run_id:x}',
                                  is_primary=jax.process_index() == 0)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad `--config.key=value` as one line, not a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as error:
    raise SystemExit(f'error: {error}\nPass --helpfull to see help on flags.') from error
  except (KeyError, AttributeError, TypeError, ValueError) as error:
    message = error.args[0] if error.args else repr(error)
    raise SystemExit(f'error: bad --config override: {message}') from error


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Orbax reports every file it writes at INFO level; keep the progress readable.
  logging.get_absl_handler().addFilter(lambda record: '/orbax/' not in record.pathname)
  overrides = run_config.explicit_overrides(FLAGS['config'])
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    raise SystemExit(f'error: --workdir={FLAGS.workdir} is a file; give a folder (a new one '
                     'is created)')
  try:
    if FLAGS.config.category == ALL_CATEGORIES:
      _validated(FLAGS.config)  # each category's run config is checked again
      _start_devices(FLAGS.config)
      run_all_categories(FLAGS.config, FLAGS.workdir, FLAGS.mode, overrides)
      return
    config = _checked_run_config(FLAGS.config, overrides, FLAGS.workdir)
    if FLAGS.mode == 'predict' and not config.predict_dir:
      raise app.UsageError('--mode=predict needs --config.predict_dir=<folder of images>')
    _start_devices(config)
    with _lock(FLAGS.workdir):
      run_category(config, FLAGS.workdir, FLAGS.mode)
  except USER_ERRORS as error:
    raise SystemExit(f'error: {error}') from error


def _start_devices(config: ml_collections.ConfigDict) -> None:
  parallel.initialize_distributed(config.distributed)  # before any device use
  logging.info('JAX %s on %d processes, %d devices (%s)', jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)


def run() -> None:
  """Parses the command line and runs main.py's job."""
  app.run(main, argv=sys.argv, flags_parser=_parse_flags)
