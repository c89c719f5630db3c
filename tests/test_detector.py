"""The compiled detector: one pure function, its export, and the Detector API."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from twostage_jax import Detector
from twostage_jax import calibration
from twostage_jax import detector
from twostage_jax import inference
from twostage_jax import run_config
from twostage_jax import train


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir) of a tiny run that trained both stages, with device superpixels."""
  config = demo.get_config()
  config.update_from_flattened_dict({
      'cache_dir': str(tmp_path_factory.mktemp('cache')), 'image_size': 32,
      'model.width': 4, 'demo.num_train': 20, 'demo.num_test_good': 3,
      'demo.num_test_per_defect': 1, 'train.num_workers': 0, 'train.num_steps': 3,
      'train.log_every': 3, 'train.checkpoint_every': 3, 'train.tensorboard': False,
      'eval.batch_size': 4, 'refine.threshold_rule': 'relative',
      'refine.superpixels': 'device', 'export.platforms': ('cpu',),
  })
  workdir = str(tmp_path_factory.mktemp('run'))
  run_config.save(config, workdir)
  for stage in (1, 2):
    train.train(config, workdir, stage)
  return config, workdir


def images(count, size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)


def test_the_detector_gives_the_evaluation_maps_and_scores(trained):
  config, workdir = trained
  model = inference.load_model(config, workdir)
  batch = images(5)
  maps, scores = jax.jit(detector.detector_fn(config, model))(batch)
  expected = inference.anomaly_maps(config, model, batch)['combined']
  np.testing.assert_allclose(maps, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scores, inference.image_scores(config, {'m': expected})['m'],
                             rtol=1e-5, atol=1e-7)


def test_export_equals_in_process_for_two_batch_sizes_and_says_what_a_caller_needs(trained):
  config, workdir = trained
  folder = detector.export(config, workdir)
  with open(os.path.join(folder, detector.EXPORT_FILE), 'rb') as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  model = inference.load_model(config, workdir)
  in_process = jax.jit(detector.detector_fn(config, model))
  for count in (2, 5):
    batch = images(count, seed=count)
    for got, want in zip(exported.call(batch), in_process(batch)):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

  info = json.load(open(os.path.join(folder, detector.INFO_FILE)))
  stored = json.load(open(calibration.thresholds_path(workdir)))
  assert info['input_size'] == 32 and info['method'] == 'two_stage'
  assert info['map'] == 'combined' and info['steps'] == {'stage1_step': 3, 'stage2_step': 3}
  assert info['thresholds'] == {'image': stored['image'], 'pixel': stored['pixel'],
                                'image_quantile': 0.99, 'pixel_quantile': 0.999}
  assert info['platforms'] == ['cpu'] and info['version'] == '0.1.0'


def test_loading_the_export_needs_only_jax(trained, tmp_path):
  config, workdir = trained
  folder = detector.export(config, workdir)
  batch = images(3, seed=7)
  np.save(tmp_path / 'batch.npy', batch)
  export_file = os.path.join(folder, detector.EXPORT_FILE)
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
  model = inference.load_model(config, workdir)
  np.testing.assert_allclose(np.load(tmp_path / 'maps.npy'),
                             jax.jit(detector.detector_fn(config, model))(batch)[0],
                             rtol=1e-6, atol=1e-7)


def test_predict_answers_at_each_image_size_with_the_stored_thresholds(trained):
  config, workdir = trained
  detector.export(config, workdir)
  rng = np.random.default_rng(3)
  given = [rng.integers(0, 256, (40, 50), np.uint8),          # grey
           rng.random((20, 30, 4)).astype(np.float32),        # float RGBA
           rng.integers(0, 256, (32, 32, 3), np.uint8)]
  from_workdir = Detector.load(workdir).predict(given)
  from_export = Detector.load(os.path.join(workdir, detector.EXPORT_DIR)).predict(given)
  stored = json.load(open(calibration.thresholds_path(workdir)))
  for result in (from_workdir, from_export):
    assert [m.shape for m in result.maps] == [(40, 50), (20, 30), (32, 32)]
    np.testing.assert_array_equal(result.anomalous, result.scores >= stored['image'])
    for anomaly_map, mask in zip(result.maps, result.masks):
      np.testing.assert_array_equal(mask, anomaly_map >= stored['pixel'])
  np.testing.assert_allclose(from_export.scores, from_workdir.scores, rtol=1e-6, atol=1e-7)


def test_bad_inputs_name_the_problem(trained, tmp_path):
  _, workdir = trained
  with pytest.raises(FileNotFoundError, match=f'{tmp_path} is neither a trained workdir'):
    Detector.load(str(tmp_path))
  loaded = Detector.load(workdir)
  with pytest.raises(ValueError, match=r'images must be uint8 \(N, 32, 32, 3\)'):
    loaded.detect(images(2, size=16))
  with pytest.raises(ValueError, match=r'\(H, W\) or \(H, W, 1\|3\|4\)'):
    loaded.predict([np.zeros((8, 8, 2))])
