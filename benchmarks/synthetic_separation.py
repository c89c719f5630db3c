"""How well a trained AnoSeg map separates its own synthetic anomalies (training samples).

Prints the pixel AUROC of stage 1's anomaly map against the masks of 64
hard-augmented CutPaste samples of the run's training images, and the mean
map value on normal and anomalous pixels: a map stuck at the trivial
all-normal solution scores near 0.5 here even before any test image is read.

  python benchmarks/synthetic_separation.py WORKDIR
"""

import sys

import jax.numpy as jnp
import numpy as np

from twostage_jax import data
from twostage_jax import methods
from twostage_jax.evaluation import metrics
from twostage_jax.inference import engine
from twostage_jax.workdir import run_config


def main(workdir: str, count: int = 64, seed: int = 1) -> None:
  config = run_config.load(workdir)
  model = engine.load_model(config, workdir)
  method = methods.get(config.method)
  images, _ = data.training_images(config)
  sample = method.sampler_factory(config, 1, images)()
  rng = np.random.default_rng(seed)
  samples = [sample(images[i % len(images)].astype(np.float32) / 255, rng) for i in range(count)]
  maps = method.maps_fn(config, (1,))(
      model.variables[:1], {'image': jnp.asarray(np.stack([s['image'] for s in samples]))})
  maps = np.asarray(maps[method.map_names(config, (1,))[0]])
  masks = np.stack([s['mask'] for s in samples])
  print(f'synthetic pixel AUROC {metrics.auroc(maps, masks):.3f}, map mean on normal pixels '
        f'{maps[masks == 0].mean():.4f}, on anomalous pixels {maps[masks > 0].mean():.4f}')


if __name__ == '__main__':
  main(sys.argv[1])
