"""How well a trained AnoSeg map separates its own synthetic anomalies (training samples).

Prints the pixel AUROC of stage 1's anomaly map against the masks of 64
hard-augmented CutPaste samples of the run's training images, and the mean
map value on normal and anomalous pixels: a map stuck at the trivial
all-normal solution scores near 0.5 here even before any test image is read.
With --every-checkpoint, one line per kept stage-1 checkpoint (the same
samples each time), so runs can be compared over training; --json writes
the figures for benchmarks/plot_diagnostics.py.

  python benchmarks/synthetic_separation.py WORKDIR [--every-checkpoint] [--json=FILE]
"""

import argparse
import json
import os

import jax.numpy as jnp
import numpy as np

from twostage_jax import data
from twostage_jax import methods
from twostage_jax.evaluation import metrics
from twostage_jax.inference import engine
from twostage_jax.workdir import paths


def _separation(method, config, model, samples) -> dict[str, float]:
  maps = method.maps_fn(config, (1,))(
      model.variables[:1], {'image': jnp.asarray(np.stack([s['image'] for s in samples]))})
  maps = np.asarray(maps[method.map_names(config, (1,))[0]])
  masks = np.stack([s['mask'] for s in samples])
  return {'step': model.stage_steps[0], 'synthetic_pixel_auroc': metrics.auroc(maps, masks),
          'map_mean_normal': float(maps[masks == 0].mean()),
          'map_mean_anomalous': float(maps[masks > 0].mean())}


def main(workdir: str, every_checkpoint: bool, json_path: str | None, count: int = 64,
         seed: int = 1) -> None:
  config = methods.trained_config(workdir)
  method = methods.get(config.method)
  images, _ = data.training_images(config)
  sample = method.sampler_factory(config, 1, images)()
  rng = np.random.default_rng(seed)
  samples = [sample(images[i % len(images)].astype(np.float32) / 255, rng) for i in range(count)]
  folder = paths.stage_checkpoints(workdir, 1)
  steps = (sorted(int(name) for name in os.listdir(folder) if name.isdigit())
           if every_checkpoint else [-1])
  rows = []
  for step in steps:
    chosen = config.copy_and_resolve_references()
    chosen.eval.stage1_step = step
    chosen.eval.stage2_step = -1
    model = engine.load_model(chosen, workdir)
    model = engine.TrainedModel(model.method, model.variables[:1], model.stage_steps[:1],
                                method.final_map(config, (1,)))
    row = _separation(method, config, model, samples)
    rows.append(row)
    print(f'step {row["step"]}: synthetic pixel AUROC {row["synthetic_pixel_auroc"]:.3f}, map '
          f'mean on normal pixels {row["map_mean_normal"]:.4f}, on anomalous pixels '
          f'{row["map_mean_anomalous"]:.4f}', flush=True)
  if json_path:
    with open(json_path, 'w', encoding='utf-8') as f:
      json.dump({'workdir': workdir, 'samples': count, 'rows': rows}, f, indent=1)


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('workdir')
  parser.add_argument('--every-checkpoint', action='store_true')
  parser.add_argument('--json')
  arguments = parser.parse_args()
  main(arguments.workdir, arguments.every_checkpoint, arguments.json)
