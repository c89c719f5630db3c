"""Trains and evaluates the two-stage anomaly segmentation model.

  python main.py --config=configs/demo.py --workdir=runs/demo
  python main.py --config=configs/mvtec.py --workdir=runs/bottle \
      --config.data_dir=/data/mvtec_ad --config.category=bottle
  python main.py --config=configs/mvtec.py --workdir=runs/bottle --mode=evaluate

Running the same training command again resumes from the latest checkpoint.
"""

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from twostage_jax import config_validation
from twostage_jax import evaluate
from twostage_jax import parallel
from twostage_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Config file; override values with --config.key=value.',
    lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and evaluation.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'],
                  'train: train (or resume), then evaluate; evaluate: evaluate a checkpoint.')
flags.mark_flags_as_required(['config', 'workdir'])


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
  if FLAGS.mode == 'train':
    state = train.train(config, FLAGS.workdir)
    variables = parallel.to_host({'params': state.params, 'batch_stats': state.batch_stats})
    evaluate.evaluate(config, FLAGS.workdir, variables, step=int(parallel.to_host(state.step)))
  else:
    evaluate.evaluate(config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
