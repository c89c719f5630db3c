"""Stage-1 evaluation: anomaly maps of the test split, image scores, MVTec metrics."""

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from twostage_jax import checkpoints as checkpoints_lib
from twostage_jax import data
from twostage_jax import metrics
from twostage_jax import parallel
from twostage_jax import train
from twostage_jax.models.segmentation import DATA_AXIS

Variables = dict[str, Any]


def load_variables(config: ml_collections.ConfigDict, workdir: str) -> tuple[Variables, int]:
  """Params and batch statistics of the checkpoint at `config.eval.step` (-1: latest)."""
  directory = train.checkpoint_dir(workdir)
  checkpoints = checkpoints_lib.Checkpoints(directory, config.train, read_only=True)
  step = checkpoints.latest_step() if config.eval.step < 0 else config.eval.step
  if step is None:
    raise FileNotFoundError(
        f'no stage-1 checkpoint in {os.path.abspath(directory)}; train first '
        '(--mode=train) or point --workdir at a trained run')
  state = checkpoints.restore(step, train.abstract_train_state(config, parallel.make_mesh()))
  checkpoints.close()
  host = parallel.to_host({'params': state.params, 'batch_stats': state.batch_stats})
  return host, step


def mean_filter_max(maps: jax.Array, size: int) -> jax.Array:
  """Image scores: max of the size x size mean-filtered maps (zeros outside)."""
  window = (1, size, size)
  summed = jax.lax.reduce_window(maps, 0.0, jax.lax.add, window, (1, 1, 1), 'SAME')
  return (summed / (size * size)).max(axis=(1, 2))


def predict(config: ml_collections.ConfigDict, variables: Variables,
            images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Stage-1 anomaly maps (N, H, W) and image scores (N,) of uint8 images.

  Batches are split over this process's devices; the last batch is padded.
  """
  model = train.create_model(config)
  mesh = Mesh(np.array(jax.local_devices()), (DATA_AXIS,))
  devices = mesh.devices.size
  batch_size = -(-config.eval.batch_size // devices) * devices

  @jax.jit
  def infer(variables, batch):
    maps = model.apply(variables, batch.astype(jnp.float32) / 255.0, train=False)
    return maps, mean_filter_max(maps, config.eval.score_filter_size)

  variables = jax.device_put(variables, parallel.replicated(mesh))
  maps, scores = [], []
  for start in range(0, len(images), batch_size):
    batch = images[start:start + batch_size]
    count = len(batch)
    batch = np.concatenate([batch, np.zeros((batch_size - count,) + batch.shape[1:], batch.dtype)])
    batch_maps, batch_scores = infer(
        variables, jax.device_put(batch, parallel.batch_sharded(mesh)))
    maps.append(np.asarray(batch_maps)[:count])
    scores.append(np.asarray(batch_scores)[:count])
  return np.concatenate(maps), np.concatenate(scores)


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             variables: Variables | None = None, step: int | None = None) -> dict[str, Any]:
  """Scores the test split; writes `<workdir>/eval/metrics.json` and prints a table."""
  if variables is None:
    variables, step = load_variables(config, workdir)
  test = data.load_test_set(data.resolve_data_dir(config), config.category, config.image_size)
  logging.info('evaluating step %s on %d test images', step, len(test.images))
  maps, scores = predict(config, variables, test.images)
  results = {
      'category': config.category,
      'step': step,
      'num_images': len(test.images),
      'num_anomalous': int(test.labels.sum()),
      'pixel_auroc': metrics.auroc(maps, test.masks),
      'image_auroc': metrics.auroc(scores, test.labels),
      'pixel_aupro': metrics.aupro(maps, test.masks),
      'pixel_ap': metrics.average_precision(maps, test.masks),
      'pixel_f1_max': metrics.f1_max(maps, test.masks)[0],
      'image_f1_max': metrics.f1_max(scores, test.labels)[0],
      'pixel_iou_max': metrics.iou_max(maps, test.masks)[0],
  }
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, 'eval')
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
      json.dump(results, f, indent=2)
  print(format_table(results), flush=True)
  return results


_COLUMNS = (('pixel_auroc', 'pixel AUROC'), ('image_auroc', 'image AUROC'),
            ('pixel_aupro', 'AUPRO@0.3'), ('pixel_ap', 'pixel AP'),
            ('pixel_f1_max', 'pixel F1'), ('image_f1_max', 'image F1'),
            ('pixel_iou_max', 'IoU'))


def format_table(results: dict[str, Any]) -> str:
  header = f'{"category":<12}{"step":>7}{"images":>7}' + ''.join(
      f'{title:>13}' for _, title in _COLUMNS)
  row = f'{results["category"]:<12}{results["step"]:>7}{results["num_images"]:>7}' + ''.join(
      f'{results[key]:>13.4f}' for key, _ in _COLUMNS)
  return '\n'.join([header, '-' * len(header), row])
