"""SLIC labels of the images to map, computed ahead in worker processes.

Stage 2 needs the SLIC superpixels of every input image. SLIC holds the GIL,
so with workers it runs in spawned processes (a `pipeline.WorkerPool`) that
label ahead while the device maps the batches already labelled. This module
never imports JAX: the workers import it.
"""

import itertools
from multiprocessing import shared_memory
from typing import Any, Callable, Iterator

import ml_collections
import numpy as np

from twostage_jax.runtime import pipeline
from twostage_jax.synthesis import superpixel


def _labeller(images_name: str, shape: tuple[int, ...], dtype: str,
              settings: dict[str, Any]) -> Callable[[int, int], np.ndarray]:
  """A worker's task: the labels of images[start:stop] of the shared images."""
  shared = shared_memory.SharedMemory(name=images_name)

  def label(start: int, stop: int) -> np.ndarray:
    images = np.ndarray(shape, np.dtype(dtype), buffer=shared.buf)
    return np.stack([superpixel.slic_labels(image, **settings) for image in images[start:stop]])

  return label


def _labels_in_order(pool: pipeline.WorkerPool, spans: Iterator[tuple[int, int]],
                     ahead: int) -> Iterator[np.ndarray]:
  """Per-image labels of `spans` in order, with up to `ahead` spans in the workers."""
  pending = 0
  for span in itertools.islice(spans, ahead):
    pool.submit(*span)
    pending += 1
  while pending:
    labels = pool.result()
    pending -= 1
    span = next(spans, None)
    if span is not None:
      pool.submit(*span)
      pending += 1
    yield from labels


def superpixel_batches(images: np.ndarray, config: ml_collections.ConfigDict,
                       batch_size: int, num_workers: int) -> Iterator[np.ndarray]:
  """int32 (B, H, W) SLIC labels (`refine` settings) of consecutive batches.

  With `num_workers` > 0 and more than a few images, spawned workers read
  the images from shared memory and label up to two batches ahead of the
  consumer. A worker that dies raises `pipeline.WorkerDied`.
  """
  settings = {'n_segments': config.refine.n_segments,
              'compactness': config.refine.compactness, 'sigma': config.refine.sigma}
  starts = range(0, len(images), batch_size)
  if num_workers == 0 or len(images) < 4 * num_workers:
    for start in starts:
      yield np.stack([superpixel.slic_labels(image, **settings)
                      for image in images[start:start + batch_size]])
    return
  chunk = max(1, min(4, batch_size // num_workers))
  spans = ((start, min(start + chunk, len(images))) for start in range(0, len(images), chunk))
  shared = pipeline.new_shared_memory(images.nbytes)
  try:
    np.ndarray(images.shape, images.dtype, buffer=shared.buf)[...] = images
    with pipeline.WorkerPool(num_workers, _labeller,
                             (shared.name, images.shape, images.dtype.str, settings),
                             'SLIC') as pool:
      labels = _labels_in_order(pool, spans, 2 * -(-batch_size // chunk))
      for start in starts:
        yield np.stack(list(itertools.islice(labels, len(images[start:start + batch_size]))))
  finally:
    shared.close()
    shared.unlink()
