"""A workdir and an export written before the package was regrouped (issue 26) still serve.

tests/fixtures/premove_two_stage was written at commit e1003e9, before any
module moved, by training the tiny shared run's config (tests/tiny_runs.py,
TensorBoard off) for both stages, evaluating it and exporting its detector;
`expected_maps.npz` holds that commit's final maps and image scores of the
demo test images. Only the last checkpoint of each stage is kept.
"""

import json
import os
import shutil

import numpy as np
import pytest

import float32_tolerance  # tests/float32_tolerance.py
import tiny_runs  # tests/tiny_runs.py
from twostage_jax import Detector
from twostage_jax import data
from twostage_jax.evaluation import evaluate
from twostage_jax.inference import engine

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'premove_two_stage')


@pytest.fixture(scope='module')
def premove(tmp_path_factory):
  """(config, a copy of the fixture workdir, the demo test images, the stored maps)."""
  workdir = str(tmp_path_factory.mktemp('premove') / 'run')
  shutil.copytree(FIXTURE, workdir)
  config = tiny_runs.two_stage_config(**{'train.tensorboard': False})
  expected = dict(np.load(os.path.join(FIXTURE, 'expected_maps.npz')))
  return config, workdir, data.category_test_set(config).images, expected


def test_its_checkpoints_give_the_maps_and_scores_they_gave(premove):
  config, workdir, images, expected = premove
  maps, scores = engine.maps_and_scores(config, engine.load_model(config, workdir), images)
  assert set(maps) == {'stage 1', 'stage 2', 'combined'}
  for name in maps:
    float32_tolerance.assert_same_function(maps[name], expected[f'map {name}'], err_msg=name)
    float32_tolerance.assert_same_function(scores[name], expected[f'score {name}'],
                                           err_msg=name)


def test_its_export_loads_and_predicts_what_it_predicted(premove):
  _, workdir, images, expected = premove
  prediction = Detector.load(os.path.join(workdir, 'export')).predict(images)
  float32_tolerance.assert_same_function(np.stack(prediction.maps), expected['map combined'])
  float32_tolerance.assert_same_function(prediction.scores, expected['score combined'])


def test_it_evaluates_to_the_figures_it_had(premove):
  config, workdir, _, _ = premove
  with open(os.path.join(FIXTURE, 'eval', 'metrics.json')) as f:
    stored = json.load(f)
  results = evaluate.evaluate(config, workdir)
  # Maps equal to 1e-4 of their scale (above) can only swap the order of
  # pixels that close to each other, a small share of the ranked pairs.
  for group in ('rows', 'references'):
    assert set(results[group]) == set(stored[group])
    for row, figures in stored[group].items():
      for metric in ('pixel_auroc', 'image_auroc', 'pixel_aupro'):
        assert results[group][row][metric] == pytest.approx(figures[metric], abs=1e-3), (
            row, metric)
