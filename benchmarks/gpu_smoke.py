"""Versions, the device, and one compiled train step: the GPU run's first, fail-fast phase.

  python benchmarks/gpu_smoke.py --config=configs/mvtec.py --json=smoke.json

Writes the versions of Python, JAX, jaxlib, Flax, Optax, Orbax and, on a GPU,
CUDA and cuDNN, the device, and the time to compile and run one data-parallel
train step of the config's stage-1 network on a synthetic batch. Exits
non-zero (and writes nothing) when the step fails or its loss is not finite.
"""

import functools
import importlib.metadata
import json
import math
import platform
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

import machine
from twostage_jax import methods
from twostage_jax.runtime import parallel
from twostage_jax.training import train_state
from twostage_jax.training import train_step

config_flags.DEFINE_config_file('config', 'configs/mvtec.py', 'Config file.')
flags.DEFINE_string('json', None, 'Write the figures to this JSON file.')
FLAGS = flags.FLAGS

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'scikit-image',
            'ml-collections', 'dm-pix', 'torch')


def versions() -> dict[str, str | None]:
  """Installed versions of the packages the run depends on (None: not installed)."""
  found = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      found[name] = None
  return found


def gpu_libraries() -> dict[str, str]:
  """CUDA runtime and cuDNN versions as jaxlib's CUDA plugin reports them."""
  from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
  if cuda_versions is None:
    return {'cuda_plugin': 'none'}
  return {'cuda_runtime': str(cuda_versions.cuda_runtime_get_version()),
          'cudnn': str(cuda_versions.cudnn_get_version()),
          'platform_version': jax.devices()[0].client.platform_version}


def main(_):
  config = FLAGS.config
  size, batch_size = config.image_size, config.train.global_batch_size
  figures = {'machine': machine.describe(), 'versions': versions(),
             'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
             'device_count': jax.device_count()}
  if jax.default_backend() == 'gpu':
    figures.update(gpu_libraries())
  print(json.dumps(figures, indent=1))
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      'image': rng.random((batch_size, size, size, 3), dtype=np.float32),
      'mask': (rng.random((batch_size, size, size)) < 0.1).astype(np.float32)},
      parallel.batch_sharded(mesh))
  state = jax.device_put(train_state.create_train_state(methods.get(config.method), config,
                                                        train_state.prng_key(0)),
                         parallel.replicated(mesh))
  objective = methods.get(config.method).objective(config, 1)
  step = parallel.data_parallel(functools.partial(train_step.train_step, objective=objective),
                                mesh)
  start = time.perf_counter()
  _, metrics = jax.block_until_ready(step(state, batch, train_state.prng_key(1)))
  loss = float(metrics['loss'])
  figures.update({'image_size': size, 'width': config.model.width, 'global_batch': batch_size,
                  'compile_and_first_step_s': time.perf_counter() - start, 'loss': loss})
  if not math.isfinite(loss):
    raise SystemExit(f'the first step gave a loss of {loss}')
  print(f'one step compiled and run in {figures["compile_and_first_step_s"]:.1f} s, '
        f'loss {loss:.4f}')
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(figures, f, indent=1)


if __name__ == '__main__':
  app.run(main)
