"""Train-step throughput (images/s) of the stage-1 network for a config.

  python benchmarks/train_step.py --config=configs/mvtec.py \
      --config.model.width=32 --config.image_size=128

Times the jit-compiled, data-parallel step on every visible device on
synthetic batches (no input pipeline), after one warm-up step.
"""

import functools
import os
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import machine  # pylint: disable=g-import-not-at-top
from twostage_jax import parallel  # pylint: disable=g-import-not-at-top
from twostage_jax import train  # pylint: disable=g-import-not-at-top

config_flags.DEFINE_config_file('config', 'configs/mvtec.py', 'Config file.')
flags.DEFINE_integer('steps', 20, 'Timed steps.')
FLAGS = flags.FLAGS


def main(_):
  config = FLAGS.config
  mesh = parallel.make_mesh()
  batch_size = config.train.global_batch_size
  parallel.local_batch_size(batch_size)
  size = config.image_size
  rng = np.random.default_rng(0)
  masks = (rng.random((batch_size, size, size)) < 0.1).astype(np.float32)
  batch = jax.device_put(
      {'image': rng.random((batch_size, size, size, 3), dtype=np.float32), 'mask': masks},
      parallel.batch_sharded(mesh))
  state = jax.device_put(train.create_train_state(config, train.prng_key(0)),
                         parallel.replicated(mesh))
  step = parallel.data_parallel(
      functools.partial(train.train_step, objective=train.objective(config, 1)), mesh)
  key = train.prng_key(0)
  start = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / FLAGS.steps
  print(f'machine: {machine.describe()}; {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, JAX {jax.__version__}')
  print(f'config: image {size}x{size}, width {config.model.width}, global batch {batch_size}')
  print(f'first step (compile + run): {compile_s:.1f} s')
  print(f'step time: {step_s * 1e3:.1f} ms   throughput: {batch_size / step_s:.1f} images/s')


if __name__ == '__main__':
  app.run(main)
