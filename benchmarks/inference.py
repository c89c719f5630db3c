"""Test-time throughput of the full two-stage inference, and SLIC's share of it.

  python benchmarks/inference.py --config=configs/mvtec.py \
      --config.model.width=16 --config.image_size=256 --images=64

Times `inference.anomaly_maps` (stage 1, host SLIC of every image, the
refinement, stage 2 and the combined map) on synthetic uint8 test images
with freshly initialised networks (speed does not depend on the weights),
after a warm-up call that compiles. SLIC and the networks are also timed
alone; the full call overlaps them, so SLIC's share is SLIC alone over the
full call.
"""

import time

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

import machine
from twostage_jax import inference
from twostage_jax import methods
from twostage_jax import parallel
from twostage_jax import precision
from twostage_jax import superpixel_pool
from twostage_jax import train_state

config_flags.DEFINE_config_file('config', 'configs/mvtec.py', 'Config file.')
flags.DEFINE_integer('images', 64, 'Test images per timed call.')
FLAGS = flags.FLAGS


def main(_):
  config = FLAGS.config
  size = config.image_size
  images = np.random.default_rng(0).integers(0, 256, (FLAGS.images, size, size, 3), np.uint8)
  mesh = parallel.make_mesh()
  variables = [
      parallel.to_host(train_state.variables_of(jax.device_put(
          train_state.create_train_state(config, train_state.prng_key(seed)),
          parallel.replicated(mesh))))
      for seed in (0, 1)]
  model = inference.TrainedModel(config.method, tuple(variables), (1, 1),
                                 methods.get(config.method).final_map(config, (1, 2)))
  batch_size = config.eval.batch_size

  start = time.perf_counter()
  inference.anomaly_maps(config, model, images[:batch_size])
  warm_up_s = time.perf_counter() - start

  start = time.perf_counter()
  labels = np.concatenate(list(superpixel_pool.superpixel_batches(
      images, config, batch_size, config.train.num_workers)))
  slic_s = time.perf_counter() - start

  infer = parallel.per_shard(inference.maps_and_scores_fn(config, model.trained), mesh)
  device_variables = jax.device_put(model.variables, parallel.replicated(mesh))
  batches = [jax.device_put({'image': images[i:i + batch_size], 'labels': labels[i:i + batch_size]},
                            parallel.batch_sharded(mesh))
             for i in range(0, len(images), batch_size)]
  jax.block_until_ready(infer(device_variables, batches[0]))
  start = time.perf_counter()
  for batch in batches:
    maps = infer(device_variables, batch)
  jax.block_until_ready(maps)
  device_s = time.perf_counter() - start

  start = time.perf_counter()
  maps = inference.anomaly_maps(config, model, images)
  total_s = time.perf_counter() - start

  print(f'machine: {machine.describe()}; {jax.device_count()} x '
        f'{jax.devices()[0].device_kind}, JAX {jax.__version__}')
  print(f'config: image {size}x{size}, width {config.model.width}, compute dtype '
        f'{config.model.compute_dtype} ({jax.numpy.dtype(precision.compute_dtype(config)).name}), '
        f'eval batch {config.eval.batch_size}, SLIC workers {config.train.num_workers}, '
        f'maps {", ".join(maps)}')
  print(f'warm-up call ({batch_size} images, compiles): {warm_up_s:.1f} s')
  n = len(images)
  print(f'SLIC alone:            {slic_s:6.2f} s  {n / slic_s:7.1f} images/s')
  print(f'networks alone:        {device_s:6.2f} s  {n / device_s:7.1f} images/s')
  print(f'full inference:        {total_s:6.2f} s  {n / total_s:7.1f} images/s  '
        f'(SLIC alone = {slic_s / total_s:.0%} of it)')


if __name__ == '__main__':
  app.run(main)
