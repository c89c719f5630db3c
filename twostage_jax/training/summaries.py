"""TensorBoard logs of training, written without TensorFlow.

Each stage writes its own run folder, `<workdir>/tensorboard/stage<n>/`, so
`tensorboard --logdir <workdir>/tensorboard` shows the stages as runs
'stage1', 'stage2' with their curves on shared charts. The event files come
from tensorboardX, which carries TensorBoard's protobufs itself: flax's and
clu's writers go through `tf.summary` (TensorFlow), torch's needs PyTorch.
Only process 0 writes; `train.tensorboard = False` writes nothing.

Tags:
  train/<key>     every number of the metrics.jsonl record at its step: the
                  objective's terms, learning_rate, images_per_s and
                  data_wait_fraction.
  samples/<key>   at step 0 of a fresh run, the first `train.tensorboard_images`
                  samples of the first batch the stage trains on: each float
                  (B, H, W[, C]) entry (the pseudo-anomalous 'image' and its
                  'mask'; Bauer's also the normal 'target').
  held_out/image, held_out/<map name>
                  at each checkpoint, the first held-out normal images and the
                  method's anomaly maps of them.
Each tag holds one strip of its images (rows of 8), so sample i sits at the
same place in every tag of a step.
"""

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorboardX
from jax.experimental import multihost_utils

from twostage_jax.inference import engine
from twostage_jax.methods import base
from twostage_jax.runtime import parallel
from twostage_jax.training import train_state
from twostage_jax.workdir import paths

# Metrics.jsonl keys that are not measurements.
_NOT_SCALARS = ('stage', 'step', 'time')


def log_dir(workdir: str, stage: int) -> str:
  """The folder of `stage`'s event files."""
  return paths.tensorboard_dir(workdir, stage)


def _tag(name: str) -> str:
  """`name` with what TensorBoard tags may not hold ('stage 1') replaced by '_'."""
  return re.sub(r'[^-/\w.]', '_', name)


def _local_rows(array: jax.Array, count: int) -> np.ndarray:
  """The first `count` rows this process holds of a batch split over devices."""
  shards = sorted(array.addressable_shards, key=lambda shard: shard.index[0].start or 0)
  return np.concatenate([np.asarray(shard.data) for shard in shards])[:count]


def _normalised(maps: np.ndarray) -> np.ndarray:
  """(k, H, W) maps stretched jointly to [0, 1] by their min and max (constant: 0).

  One scale for the k images keeps their levels comparable within a step;
  the scale itself changes from checkpoint to checkpoint.
  """
  low, span = maps.min(), np.ptp(maps)
  return (maps - low) / span if span > 0 else np.zeros_like(maps)


class HeldOutMaps:
  """The method's anomaly maps of a few held-out normal images at the current state.

  The maps are those evaluation and the detector report, from the same
  compiled function (`engine.compiled_maps_and_scores`), with the images
  split over the training mesh's devices. The images and their host inputs
  (stage 2's SLIC labels) are prepared and sent to the devices once; every
  process must call it, since the variables span all of them.
  """

  def __init__(self, method: base.Method, config: ml_collections.ConfigDict, stage: int,
               images: np.ndarray, mesh: jax.sharding.Mesh):
    trained = method.frozen_stages(stage) + (stage,)
    self.images = images.astype(np.float32) / 255.0
    self._count = len(images)
    padded_count = -(-len(images) // mesh.devices.size) * mesh.devices.size
    images = np.concatenate(
        [images, np.zeros((padded_count - len(images),) + images.shape[1:], images.dtype)])
    batch = {'image': images,
             **next(method.host_inputs(config, trained, images, padded_count, 0))}
    sharding = parallel.batch_sharded(mesh)
    self._batch = {key: jax.make_array_from_callback(value.shape, sharding,
                                                     lambda index, v=value: v[index])
                   for key, value in batch.items()}
    self._maps_and_scores = engine.compiled_maps_and_scores(method, config, trained, mesh)

  def __call__(self, variables: tuple[train_state.Variables, ...]) -> dict[str, np.ndarray]:
    """float32 (k, H, W) maps by name of the trained stages' `variables` (in stage order)."""
    maps, _ = self._maps_and_scores(variables, self._batch)
    maps = multihost_utils.process_allgather(maps, tiled=True)
    return {name: np.asarray(value, np.float32)[:self._count] for name, value in maps.items()}


class Writer:
  """The TensorBoard summaries of one stage's training; see the module docstring.

  On every process but 0, and with `train.tensorboard` off, nothing is
  written; the held-out maps are still computed on every process when on,
  since all of them hold the variables.
  """

  def __init__(self, method: base.Method, workdir: str, config: ml_collections.ConfigDict,
               stage: int, start_step: int, held_out: np.ndarray, mesh: jax.sharding.Mesh):
    """Opens `log_dir(workdir, stage)`; `held_out` are uint8 normal images never trained on."""
    self._count = config.train.tensorboard_images if config.train.tensorboard else 0
    self._writer = None
    if config.train.tensorboard and jax.process_index() == 0:
      # A resumed run repeats the steps after its checkpoint: TensorBoard hides
      # what older event files hold from the first of them on (all of it when
      # the stage starts afresh).
      self._writer = tensorboardX.SummaryWriter(
          log_dir(workdir, stage), purge_step=start_step + 1 if start_step else 0,
          flush_secs=30)
    self._held_out = None
    if self._count and len(held_out):
      self._held_out = HeldOutMaps(method, config, stage, held_out[:self._count], mesh)

  def scalars(self, step: int, record: Mapping[str, float]) -> None:
    """Writes the numbers of a metrics.jsonl `record` as train/<key>."""
    if self._writer is None:
      return
    for key, value in record.items():
      if key not in _NOT_SCALARS:
        self._writer.add_scalar(f'train/{key}', value, step)

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """Writes (N, H, W) or (N, H, W, C) images with values in [0, 1] as one strip per tag."""
    if self._writer is None:
      return
    for tag, value in images.items():
      value = np.asarray(value, np.float32)
      if value.ndim == 3:
        value = value[..., None]
      pixels = np.round(np.clip(value, 0.0, 1.0) * 255).astype(np.uint8)
      self._writer.add_images(_tag(tag), pixels, step, dataformats='NHWC')

  def samples(self, batch: Mapping[str, jax.Array]) -> None:
    """Writes the first samples of the batch the stage trains on as step 0's samples/<key>."""
    if self._writer is None or not self._count:
      return
    self.images(0, {f'samples/{key}': _local_rows(value, self._count)
                    for key, value in batch.items()
                    if value.ndim in (3, 4) and jnp.issubdtype(value.dtype, jnp.floating)})

  def checkpoint(self, step: int, variables: tuple[train_state.Variables, ...]) -> None:
    """Writes the held-out images and their normalised maps (`_normalised`), then flushes.

    Args:
      step: the checkpoint's step.
      variables: the frozen earlier stages' variables, then the current state's.
    """
    if self._held_out is not None:
      maps = self._held_out(variables)
      images = {f'held_out/{name}': _normalised(value) for name, value in maps.items()}
      self.images(step, {'held_out/image': self._held_out.images, **images})
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    """Writes what is pending and closes the event file."""
    if self._writer is not None:
      self._writer.close()
