"""Inference: trained checkpoints -> anomaly maps and image scores.

Two-stage model: stage 1 maps each image; the refinement (refine.py) keeps
the SLIC superpixels it flagged; stage 2 maps that masked image; the final
map combines both. SLIC runs on the host, in worker processes. Bauer's
autoencoder: the absolute reconstruction error averaged over the channels,
Gaussian-smoothed. Networks run on this process's devices, the images split
over them.
"""

import concurrent.futures
import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from twostage_jax import losses
from twostage_jax import parallel
from twostage_jax import refine
from twostage_jax import synthesis
from twostage_jax import train
from twostage_jax import xla_options
from twostage_jax.models.segmentation import DATA_AXIS

Variables = dict[str, Any]
STAGE1, STAGE2, COMBINED = 'stage 1', 'stage 2', 'combined'
AUTOENCODER = 'autoencoder'
MAP_NAMES = (STAGE1, STAGE2, COMBINED, AUTOENCODER)  # the order of every report


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """Host copies of the trained variables; stage 2 is None if not trained.

  For Bauer's method (`method='bauer'`) stage 1 is the autoencoder.
  """

  method: str
  stage1: Variables
  stage1_step: int
  stage2: Variables | None = None
  stage2_step: int | None = None

  @property
  def final_map(self) -> str:
    """Name of the map decisions are made on."""
    if self.method == 'bauer':
      return AUTOENCODER
    return STAGE1 if self.stage2 is None else COMBINED

  @property
  def steps(self) -> dict[str, int | None]:
    return {'stage1_step': self.stage1_step, 'stage2_step': self.stage2_step}


def _has_checkpoint(workdir: str, stage: int) -> bool:
  folder = train.checkpoint_dir(workdir, stage)
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def load_model(config: ml_collections.ConfigDict, workdir: str) -> TrainedModel:
  """Restores stage 1 and, when it was trained, stage 2 (`eval.stage<n>_step`).

  Raises:
    FileNotFoundError: naming the workdir, if stage 1 has no checkpoint.
  """
  mesh = parallel.make_mesh()
  state1, step1 = train.restore_state(config, workdir, 1, mesh, config.eval.stage1_step)
  stage1 = parallel.to_host(train.variables_of(state1))
  if config.method == 'bauer':
    return TrainedModel(config.method, stage1, step1)
  if not _has_checkpoint(workdir, 2):
    logging.warning('no stage-2 checkpoint in %s: using stage 1 alone',
                    train.checkpoint_dir(workdir, 2))
    return TrainedModel(config.method, stage1, step1)
  state2, step2 = train.restore_state(config, workdir, 2, mesh, config.eval.stage2_step)
  return TrainedModel(config.method, stage1, step1,
                      parallel.to_host(train.variables_of(state2)), step2)


def superpixel_batches(images: np.ndarray, config: ml_collections.ConfigDict,
                       batch_size: int, num_workers: int) -> Iterator[np.ndarray]:
  """int32 (B, H, W) SLIC labels (`refine` settings) of consecutive batches.

  SLIC holds the GIL, so with `num_workers` > 0 and more than a few images
  it runs in spawned processes that work ahead while the device maps the
  batches already labelled.
  """
  label = functools.partial(
      synthesis.slic_labels, n_segments=config.refine.n_segments,
      compactness=config.refine.compactness, sigma=config.refine.sigma)
  starts = range(0, len(images), batch_size)
  if num_workers == 0 or len(images) < 4 * num_workers:
    for start in starts:
      yield np.stack([label(image) for image in images[start:start + batch_size]])
    return
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
    labels = pool.map(label, images, chunksize=max(1, min(4, batch_size // num_workers)))
    for start in starts:
      yield np.stack(list(itertools.islice(labels, len(images[start:start + batch_size]))))


def mean_filter_max(maps: jax.Array, size: int) -> jax.Array:
  """Image scores: max of the size x size mean-filtered maps (zeros outside)."""
  window = (1, size, size)
  summed = jax.lax.reduce_window(maps, 0.0, jax.lax.add, window, (1, 1, 1), 'SAME')
  return (summed / (size * size)).max(axis=(1, 2))


def smooth(maps: jax.Array, sigma: float) -> jax.Array:
  """Gaussian smoothing of (B, H, W) maps; the window spans 3 sigma each side; 0: none."""
  if sigma == 0:
    return maps
  window = 2 * int(np.ceil(3 * sigma)) + 1
  return losses.gaussian_filter_same(window, sigma)(maps[..., None])[..., 0]


def reconstruction_error_map(reconstructions: jax.Array, images: jax.Array) -> jax.Array:
  """Bauer's anomaly map (B, H, W): |F(X) - X| averaged over the channels.

  The paper's heatmap averages the per-channel reconstruction difference
  over the colour channels (and smooths it: `eval.map_sigma`).
  """
  return jnp.mean(jnp.abs(reconstructions.astype(jnp.float32) - images), axis=-1)


def maps_fn(config: ml_collections.ConfigDict, two_stage: bool):
  """Pure (variables, batch) -> {map name: (B, H, W)} for one device's images.

  Every reported map is smoothed by `eval.map_sigma`; the refinement reads
  the raw stage-1 map, as in training.
  """
  model = train.create_model(config)

  def maps(variables, batch):
    images = batch['image'].astype(jnp.float32) / 255.0
    if config.method == 'bauer':
      reconstructions = model.apply(variables[0], images, train=False)
      out = {AUTOENCODER: reconstruction_error_map(reconstructions, images)}
    else:
      out = {STAGE1: model.apply(variables[0], images, train=False)}
      if two_stage:
        selected = refine.region(out[STAGE1], batch['labels'], config.refine)
        out[STAGE2] = model.apply(
            variables[1], refine.masked_input(images, selected), train=False)
        out[COMBINED] = refine.combine(out[STAGE1], out[STAGE2], config.refine.combine)
    return {name: smooth(m, config.eval.map_sigma) for name, m in out.items()}

  return maps


@functools.lru_cache(maxsize=8)
def _compiled_maps_fn(config_json: str, two_stage: bool, mesh: Mesh):
  """maps_fn mapped over `mesh`, kept so that later calls reuse its compilation."""
  config = ml_collections.ConfigDict(json.loads(config_json))
  return parallel.per_shard(maps_fn(config, two_stage), mesh,
                            xla_options.compiler_options(config))


def anomaly_maps(config: ml_collections.ConfigDict, model: TrainedModel,
                 images: np.ndarray) -> dict[str, np.ndarray]:
  """float32 (N, H, W) maps of uint8 (N, H, W, 3) images, by map name.

  Names: 'stage 1', and with a trained stage 2 also 'stage 2' and
  'combined'. Batches of `eval.batch_size` (rounded up to a multiple of
  the local devices) are split over this process's devices; the last one
  is padded. Superpixels of later batches are computed while the device
  maps earlier ones.
  """
  two_stage = model.stage2 is not None
  mesh = Mesh(np.array(jax.local_devices()), (DATA_AXIS,))
  devices = mesh.devices.size
  batch_size = -(-config.eval.batch_size // devices) * devices
  infer = _compiled_maps_fn(config.to_json(), two_stage, mesh)
  variables = jax.device_put(
      (model.stage1, model.stage2 if two_stage else {}), parallel.replicated(mesh))
  labels = (superpixel_batches(images, config, batch_size, config.train.num_workers)
            if two_stage else itertools.repeat(None))
  outputs = []
  for start, batch_labels in zip(range(0, len(images), batch_size), labels):
    batch = {'image': images[start:start + batch_size]}
    if batch_labels is not None:
      batch['labels'] = batch_labels
    count = len(batch['image'])
    batch = {k: np.concatenate([v, np.zeros((batch_size - count,) + v.shape[1:], v.dtype)])
             for k, v in batch.items()}
    maps = infer(variables, jax.device_put(batch, parallel.batch_sharded(mesh)))
    outputs.append({k: np.asarray(v)[:count] for k, v in maps.items()})
  return {k: np.concatenate([o[k] for o in outputs]) for k in MAP_NAMES if k in outputs[0]}


def image_scores(config: ml_collections.ConfigDict, maps: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
  """(N,) image scores of every map by `eval.score_rule`.

  'mean_filter_max': the max of the `eval.score_filter_size` mean-filtered
  map (the papers' rule); 'max': the map's maximum.
  """
  if config.eval.score_rule == 'max':
    return {k: v.max(axis=(1, 2)) for k, v in maps.items()}
  score = jax.jit(functools.partial(mean_filter_max, size=config.eval.score_filter_size))
  return {k: np.asarray(score(v)) for k, v in maps.items()}
