"""Test-time throughput of the full two-stage inference, and SLIC's share of it.

  python benchmarks/inference.py --config=configs/mvtec.py \
      --config.model.width=16 --config.image_size=256 --images=64 [--json=FILE]

Times `engine.anomaly_maps` (stage 1, SLIC of every image, the refinement,
stage 2 and the combined map, as the detector runs them) on synthetic uint8
test images with freshly initialised networks (speed does not depend on the
weights), after a warm-up call that compiles. Also timed alone: the networks
and the refinement with the SLIC labels given (networks alone), SLIC on the
host (scikit-image in worker processes), and with `refine.superpixels` =
'device' SLIC on the device. The full call overlaps host SLIC with the
device, so host SLIC's share is SLIC alone over the full call.

With --onnx (the onnx extra installed), also ONNX Runtime against the JAX
detector, for this config's two-stage model and Bauer's autoencoder
(configs/bauer.py at the same image size): the jitted JAX detector
(`detector.detector_fn`, SLIC on the device) and the model's ONNX export
through `Detector.load` (the two-stage export's host step runs scikit-image
SLIC between its graphs) on the same images, in alternating rounds after a
warm-up call each, best round reported. Both use every core (ONNX Runtime's
intra-op pool, XLA:CPU's): 2 on the machine of docs/results.md.
"""

import json
import os
import tempfile
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

import machine
from configs import bauer
from twostage_jax import methods
from twostage_jax.inference import detector
from twostage_jax.inference import engine
from twostage_jax.methods.two_stage import host_slic
from twostage_jax.methods.two_stage import method as two_stage
from twostage_jax.runtime import parallel
from twostage_jax.training import precision

config_flags.DEFINE_config_file('config', 'configs/mvtec.py', 'Config file.')
flags.DEFINE_integer('images', 64, 'Test images per timed call.')
flags.DEFINE_string('json', None, 'Also write the figures to this JSON file.')
flags.DEFINE_bool('onnx', False, 'Also time ONNX Runtime against the JAX detector.')
flags.DEFINE_integer('rounds', 3, 'Alternating timed rounds of each detector (--onnx).')
FLAGS = flags.FLAGS


def _timed(fn, *args) -> tuple[float, object]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def _onnx_detector(config, model, folder, batch_size):
  """Detector.load of the model's ONNX export, written to `folder`."""
  info = {'format': 'onnx', 'input_size': config.image_size,
          'thresholds': {'image': 0.0, 'pixel': 0.0}, 'batch_size': batch_size}
  for name, program in detector.onnx_programs(config, model, info).items():
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(program)
  with open(os.path.join(folder, detector.INFO_FILE), 'w', encoding='utf-8') as f:
    json.dump(info, f)
  return detector.Detector.load(folder)


def _onnx_against_jax(config, images) -> dict:
  """Images/s of the JAX detector and the ONNX export, two-stage and Bauer, printed."""
  bauer_config = bauer.get_config()
  bauer_config.image_size = config.image_size
  figures = {}
  for name, method_config in (('two_stage', config), ('bauer', bauer_config)):
    model = engine.fresh_model(method_config)
    jax_detect = jax.jit(detector.detector_fn(model.method.pure_config(method_config), model))
    with tempfile.TemporaryDirectory() as folder:
      onnx_detector = _onnx_detector(method_config, model, folder, len(images))
      runners = {'jax': lambda: jax.block_until_ready(jax_detect(images)),
                 'onnx': lambda: onnx_detector.detect(images)}
      times = {key: [] for key in runners}
      for run in runners.values():
        run()  # compiles; builds the session's kernels
      for _ in range(FLAGS.rounds):
        for key, run in runners.items():
          start = time.perf_counter()
          run()
          times[key].append(time.perf_counter() - start)
    rates = {key: len(images) / min(values) for key, values in times.items()}
    figures[name] = {'jax_images_per_s': rates['jax'], 'onnx_images_per_s': rates['onnx'],
                     'onnx_over_jax': rates['onnx'] / rates['jax']}
    print(f'{name} detector, {len(images)} images, best of {FLAGS.rounds}: JAX '
          f'{rates["jax"]:.1f} images/s, ONNX Runtime {rates["onnx"]:.1f} images/s '
          f'(ONNX / JAX {rates["onnx"] / rates["jax"]:.2f}; {os.cpu_count()} cores)', flush=True)
  return figures


def main(_):
  config = FLAGS.config
  size = config.image_size
  images = np.random.default_rng(0).integers(0, 256, (FLAGS.images, size, size, 3), np.uint8)
  mesh = parallel.make_mesh()
  method = methods.get(config.method)
  model = engine.fresh_model(config)
  batch_size = config.eval.batch_size
  warm_up_s, _ = _timed(engine.anomaly_maps, config, model, images[:batch_size])

  slic_s, labels = _timed(lambda: np.concatenate(list(host_slic.superpixel_batches(
      images, config, batch_size, config.train.num_workers))))

  host_config = config.copy_and_resolve_references()
  host_config.refine.superpixels = 'host'
  infer = engine.compiled_maps_and_scores(method, host_config, model.trained, mesh)
  device_variables = jax.device_put(model.variables, parallel.replicated(mesh))
  batches = [jax.device_put({'image': images[i:i + batch_size], 'labels': labels[i:i + batch_size]},
                            parallel.batch_sharded(mesh))
             for i in range(0, len(images), batch_size)]
  jax.block_until_ready(infer(device_variables, batches[0]))
  device_s, _ = _timed(lambda: [infer(device_variables, batch) for batch in batches])

  device_slic_s = None
  if config.refine.superpixels == 'device':
    slic = parallel.per_shard(
        lambda _, x: two_stage.device_labels(x.astype(np.float32) / 255.0, config), mesh)
    jax.block_until_ready(slic(None, batches[0]['image']))
    device_slic_s, _ = _timed(lambda: [slic(None, batch['image']) for batch in batches])

  total_s, maps = _timed(engine.anomaly_maps, config, model, images)

  n = len(images)
  print(f'machine: {machine.describe()}; {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, JAX {jax.__version__}')
  print(f'config: image {size}x{size}, width {config.model.width}, compute dtype '
        f'{config.model.compute_dtype} ({jax.numpy.dtype(precision.compute_dtype(config)).name}), '
        f'eval batch {config.eval.batch_size}, SLIC on the {config.refine.superpixels} '
        f'({config.train.num_workers} host workers), maps {", ".join(maps)}')
  print(f'warm-up call ({batch_size} images, compiles): {warm_up_s:.1f} s')
  print(f'host SLIC alone:       {slic_s:6.2f} s  {n / slic_s:7.1f} images/s')
  if device_slic_s is not None:
    print(f'device SLIC alone:     {device_slic_s:6.2f} s  {n / device_slic_s:7.1f} images/s  '
          f'({1e3 * device_slic_s / n:.2f} ms per image)')
  print(f'networks alone:        {device_s:6.2f} s  {n / device_s:7.1f} images/s')
  print(f'full inference:        {total_s:6.2f} s  {n / total_s:7.1f} images/s  '
        f'({device_s / total_s:.0%} of the networks-alone rate; host SLIC alone = '
        f'{slic_s / total_s:.0%} of the full call)')
  onnx = _onnx_against_jax(config, images) if FLAGS.onnx else None
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump({'machine': machine.describe(), 'jax': jax.__version__,
                 'device': jax.devices()[0].device_kind, 'images': n, 'image_size': size,
                 'width': config.model.width, 'superpixels': config.refine.superpixels,
                 'warm_up_s': warm_up_s, 'full_images_per_s': n / total_s,
                 'networks_alone_images_per_s': n / device_s,
                 'full_over_networks_alone': device_s / total_s,
                 'host_slic_ms_per_image': 1e3 * slic_s / n,
                 'device_slic_ms_per_image': (None if device_slic_s is None
                                              else 1e3 * device_slic_s / n),
                 'onnx_against_jax': onnx}, f, indent=1)


if __name__ == '__main__':
  app.run(main)
