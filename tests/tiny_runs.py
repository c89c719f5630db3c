"""A tiny trained two-stage run, shared by every test that only reads it.

Training compiles the model's steps and maps, which costs more than most of
what the tests check; one run serves the tests of stage 2, evaluation,
thresholds, prediction, TensorBoard logs and the detector. A test that
changes the workdir (thresholds for another config, an export) restores it
or works on a copy.
"""

import ml_collections
import pytest

from configs import demo
from twostage_jax import methods
from twostage_jax.evaluation import evaluate
from twostage_jax.training import train

# The demo at 32x32, small enough that a run takes seconds: 20 training
# images (4 of them held out), 4 good and 2 per defect type for the test set.
TINY_DEMO = {
    'image_size': 32,
    'demo.num_train': 20,
    'demo.num_test_good': 4,
    'demo.num_test_per_defect': 2,
    'calibration.holdout_fraction': 0.2,
    'train.num_workers': 0,
    'eval.batch_size': 8,
}


def two_stage_config(**extra) -> ml_collections.ConfigDict:
  """The demo config of the shared run: width 4, 4 steps per stage, checkpoints at 2 and 4."""
  config = demo.get_config()
  config.update_from_flattened_dict({
      **TINY_DEMO,
      'model.width': 4,
      'train.num_steps': 4,
      'train.log_every': 1,
      'train.checkpoint_every': 2,
      'train.tensorboard_images': 3,
      'eval.num_examples': 2,
      # A low bar, so that stage 1 flags superpixels after only 4 steps.
      'refine.threshold_rule': 'relative',
      'refine.superpixels': 'device',
      'stage2.p_self_source': 0.3,  # self sources in stage 2 only
      'export.platforms': ('cpu',),
      **extra,
  })
  return config


@pytest.fixture(scope='session')
def two_stage_run(tmp_path_factory):
  """(config, workdir, results) of both stages trained and evaluated."""
  config = two_stage_config()
  workdir = str(tmp_path_factory.mktemp('two_stage_run'))
  for stage in (1, 2):
    train.train(methods.get(config.method), config, workdir, stage)
  return config, workdir, evaluate.evaluate(config, workdir)
