"""The compiled detector: one pure function, its export, and the Detector API."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import float32_tolerance  # tests/float32_tolerance.py

from twostage_jax import Detector
from twostage_jax.inference import calibration
from twostage_jax.inference import detector
from twostage_jax.inference import engine
from twostage_jax.workdir import paths


def images(count, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)


@pytest.fixture(scope='module')
def in_process(two_stage_run):
  """The shared run's detector function, jitted once for the tests here."""
  config, workdir, _ = two_stage_run
  return jax.jit(detector.detector_fn(config, engine.load_model(config, workdir)))


@pytest.fixture(scope='module')
def export_folder(two_stage_run):
  """The shared run's export, written once for the tests here."""
  config, workdir, _ = two_stage_run
  return detector.export(config, workdir)


def test_the_detector_gives_the_evaluation_maps_and_scores(two_stage_run, in_process):
  config, workdir = two_stage_run[:2]
  model = engine.load_model(config, workdir)
  batch = images(5)
  maps, scores = in_process(batch)
  expected = engine.anomaly_maps(config, model, batch)['combined']
  float32_tolerance.assert_same_function(maps, expected)
  float32_tolerance.assert_same_function(
      scores, engine.image_scores(config, {'m': expected})['m'])


def test_export_equals_in_process_for_two_batch_sizes_and_says_what_a_caller_needs(
    two_stage_run, in_process, export_folder):
  workdir = two_stage_run[1]
  with open(os.path.join(export_folder, detector.EXPORT_FILE), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  for count in (2, 5):
    batch = images(count, seed=count)
    for got, want in zip(exported.call(batch), in_process(batch)):
      float32_tolerance.assert_same_function(got, want)

  info = json.load(open(os.path.join(export_folder, detector.INFO_FILE)))
  stored = json.load(open(paths.thresholds_file(workdir)))
  assert info['input_size'] == 32 and info['method'] == 'two_stage'
  assert info['map'] == 'combined' and info['steps'] == {'stage1_step': 4, 'stage2_step': 4}
  assert info['thresholds'] == {'image': stored['image'], 'pixel': stored['pixel'],
                                'image_quantile': 0.99, 'pixel_quantile': 0.999}
  assert info['platforms'] == ['cpu'] and info['version'] == '0.1.0'


def test_loading_the_export_needs_only_jax(in_process, export_folder, tmp_path):
  batch = images(3, seed=7)
  np.save(tmp_path / 'batch.npy', batch)
  export_file = os.path.join(export_folder, detector.EXPORT_FILE)
  others = ('twostage_jax', 'flax', 'orbax', 'ml_collections', 'optax')
  script = (
      'import sys, numpy as np, jax\n'
      f'exported = jax.export.deserialize(bytearray(open({export_file!r}, "rb").read()))\n'
      'maps, scores = exported.call(np.load("batch.npy"))\n'
      'np.save("maps.npy", np.asarray(maps))\n'
      f'print(sorted(m for m in {others!r} if m in sys.modules))\n')
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == '[]'
  float32_tolerance.assert_same_function(np.load(tmp_path / 'maps.npy'), in_process(batch)[0])


def test_predict_answers_at_each_image_size_with_the_stored_thresholds(two_stage_run,
                                                                      export_folder):
  workdir = two_stage_run[1]
  rng = np.random.default_rng(3)
  given = [rng.integers(0, 256, (40, 50), np.uint8),          # grey
           rng.random((20, 30, 4)).astype(np.float32),        # float RGBA
           rng.integers(0, 256, (32, 32, 3), np.uint8)]
  from_workdir = Detector.load(workdir).predict(given)
  from_export = Detector.load(export_folder).predict(given)
  stored = json.load(open(paths.thresholds_file(workdir)))
  for result in (from_workdir, from_export):
    assert [m.shape for m in result.maps] == [(40, 50), (20, 30), (32, 32)]
    np.testing.assert_array_equal(result.anomalous, result.scores >= stored['image'])
    for anomaly_map, mask in zip(result.maps, result.masks):
      np.testing.assert_array_equal(mask, anomaly_map >= stored['pixel'])
  float32_tolerance.assert_same_function(from_export.scores, from_workdir.scores)


def test_bad_inputs_name_the_problem(two_stage_run, tmp_path):
  _, workdir = two_stage_run[:2]
  with pytest.raises(FileNotFoundError, match=f'{tmp_path} is neither a trained workdir'):
    Detector.load(str(tmp_path))
  loaded = Detector.load(workdir)
  with pytest.raises(ValueError, match=r'images must be uint8 \(N, 32, 32, 3\)'):
    loaded.detect(images(2, size=16))
  with pytest.raises(ValueError, match=r'\(H, W\) or \(H, W, 1\|3\|4\)'):
    loaded.predict([np.zeros((8, 8, 2))])
