"""Trains, evaluates and applies the anomaly segmentation models.

The two-stage model (configs/mvtec.py, configs/demo.py) or Bauer's
autoencoder (configs/bauer.py), through the same modes:

  python main.py --config=configs/demo.py --workdir=runs/demo
  python main.py --config=configs/mvtec.py --workdir=runs/bottle \
      --config.data_dir=/data/mvtec_ad --config.category=bottle
  python main.py --config=configs/mvtec.py --workdir=runs/bottle --mode=evaluate
  python main.py --config=configs/mvtec.py --workdir=runs/bottle --mode=predict \
      --config.predict_dir=/data/new_images
  python main.py --config=configs/mvtec.py --workdir=runs/mvtec \
      --config.data_dir=/data/mvtec_ad --config.category=all
  python main.py --config=configs/bauer.py --workdir=runs/bauer_grid \
      --config.data_dir=/data/mvtec_ad --config.category=grid

Running the same training command again resumes where it stopped.
"""

import os

import jax
import ml_collections
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from twostage_jax import atomic_write
from twostage_jax import config_validation
from twostage_jax import data
from twostage_jax import evaluate
from twostage_jax import inference
from twostage_jax import parallel
from twostage_jax import predict
from twostage_jax import report
from twostage_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file; override values with --config.key=value.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics, reports and predictions.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict'],
                  'train: train the stages of config.stage (or resume), then evaluate; '
                  'evaluate: evaluate the checkpoints; predict: score config.predict_dir.')
flags.mark_flags_as_required(['config', 'workdir'])

ALL_CATEGORIES = 'all'


def run_category(config: ml_collections.ConfigDict, workdir: str, mode: str) -> dict | None:
  """Runs `mode` for one category; returns its evaluation results."""
  if mode == 'predict':
    predict.predict(config, workdir)
    return None
  if mode == 'train':
    for stage in train.stages_to_train(config):
      train.train(config, workdir, stage)
  return evaluate.evaluate(config, workdir, inference.load_model(config, workdir))


def categories_of(config: ml_collections.ConfigDict) -> list[str]:
  """Every category under config.data_dir (the demo's when it is '')."""
  if not config.data_dir:
    return list(data.DEMO_CATEGORIES)
  return data.list_categories(config.data_dir)


def run_all_categories(config: ml_collections.ConfigDict, workdir: str, mode: str) -> None:
  """One model per category in `<workdir>/<category>`, then a summary with the mean."""
  if mode == 'predict':
    raise app.UsageError('--mode=predict uses one trained category; set --config.category '
                         'and point --workdir at that category\'s run')
  categories = categories_of(config)
  logging.info('%s on %d categories: %s', mode, len(categories), ', '.join(categories))
  results = []
  for category in categories:
    category_config = config.copy_and_resolve_references()
    category_config.category = category
    results.append(run_category(category_config, os.path.join(workdir, category), mode))
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, 'eval')
    atomic_write.write_json(os.path.join(out_dir, 'summary.json'), results)
    figures = {f'{r["category"]}: test images': f'../{r["category"]}/eval/examples.png'
               for r in results}
    atomic_write.write_text(os.path.join(out_dir, 'report.md'),
                            report.markdown_report(results, 'Evaluation: all categories', figures))
  print(report.format_table(results), flush=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = FLAGS.config
  config_validation.validate(config)
  # Orbax reports every file it writes at INFO level; keep the progress readable.
  logging.get_absl_handler().addFilter(lambda record: '/orbax/' not in record.pathname)
  parallel.initialize_distributed(config.distributed)  # before any device use
  logging.info('JAX %s on %d processes, %d devices (%s)', jax.__version__,
               jax.process_count(), jax.device_count(), jax.devices()[0].platform)
  if FLAGS.mode == 'predict' and not config.predict_dir:
    raise app.UsageError('--mode=predict needs --config.predict_dir=<folder of images>')
  try:
    if config.category == ALL_CATEGORIES:
      run_all_categories(config, FLAGS.workdir, FLAGS.mode)
    else:
      run_category(config, FLAGS.workdir, FLAGS.mode)
  except (data.DatasetError, FileNotFoundError) as error:
    # Problems with the user's files: the message names them; no traceback.
    raise SystemExit(f'error: {error}') from error


if __name__ == '__main__':
  app.run(main)
