"""Anomaly sources and their SLIC labels, built once per machine and memory-mapped.

SAIM pastes superpixels of anomaly-source images. Full DTD is 5,640 images:
at 256x256 they take 1.1 GB, and their SLIC labels for three segment counts
another 2.2 GB (uint16). Every training worker needs all of them, so a copy
per worker would multiply that by the number of workers. The store instead
writes them once into a cache folder as .npy files; workers map the same
files read-only (`np.load(mmap_mode='r')`), and the operating system keeps
one copy in its page cache however many workers read it.

A store folder is named by a fingerprint of everything its content depends
on (the source files' relative paths, byte sizes and modification times, the
built-in set's scikit-image version, or the bytes of images already in
memory; the image size; the SLIC settings; STORE_VERSION), so a changed
folder or setting builds a new store:

    <cache_dir>/sources/<name>-<size>px-<fingerprint>/
        images.npy             uint8 (N, S, S, 3)
        labels_n<k>.npy        uint16 (N, S, S), SLIC ids of image i, one per k

It is written into an `incomplete.*` folder and renamed into place, so a
reader never sees a partial store and concurrent builders (several hosts
sharing a cache folder) keep the first complete copy.
"""

import concurrent.futures
import dataclasses
import functools
import hashlib
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import skimage
from absl import logging

from twostage_jax.data import images as image_files
from twostage_jax.synthesis import sources as sources_lib
from twostage_jax.synthesis import superpixel

STORE_VERSION = 1
_SUBDIR = 'sources'
_FINGERPRINT_CHARS = 12
LABEL_DTYPE = np.uint16  # SLIC returns a few more ids than n_segments; < 65,536


class SourceStore:
  """Anomaly-source images and their SLIC labels per segment count.

  A store opened from a folder pickles as that folder's path, so worker
  processes re-open the same memory-mapped files instead of receiving a copy.
  """

  def __init__(self, images: np.ndarray, labels: dict[int, np.ndarray],
               folder: str | None = None):
    """Wraps arrays; use `open`, `from_images` or `build_source_store` instead.

    Args:
      images: uint8 (N, S, S, 3) source images.
      labels: n_segments -> (N, S, S) SLIC ids of each image.
      folder: the store folder the arrays are mapped from, if any.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f'source images must be uint8 (N, S, S, 3); got {images.dtype} '
                       f'{images.shape}')
    if images.shape[1] != images.shape[2] or not len(images):
      raise ValueError(f'source images must be square and at least one; got {images.shape}')
    for n_segments, array in labels.items():
      if array.shape != images.shape[:3]:
        raise ValueError(f'labels for n_segments={n_segments} have shape {array.shape}, '
                         f'not {images.shape[:3]}')
    self.images = images
    self._labels = dict(labels)
    self.folder = folder

  @classmethod
  def open(cls, folder: str) -> 'SourceStore':
    """Maps a built store folder read-only."""
    labels = {}
    for name in os.listdir(folder):
      if name.startswith('labels_n') and name.endswith('.npy'):
        labels[int(name[len('labels_n'):-len('.npy')])] = np.load(
            os.path.join(folder, name), mmap_mode='r')
    images = np.load(os.path.join(folder, 'images.npy'), mmap_mode='r')
    return cls(images, labels, folder)

  @classmethod
  def from_images(cls, images: Sequence[np.ndarray], n_segments: Sequence[int],
                  compactness: float, sigma: float) -> 'SourceStore':
    """An in-memory store of uint8 (S, S, 3) images (tests, small sets)."""
    stacked = np.stack(images)
    labels = {n: np.stack([superpixel.slic_labels(image, n, compactness, sigma)
                           for image in stacked]).astype(LABEL_DTYPE)
              for n in n_segments}
    return cls(stacked, labels)

  def __reduce__(self):
    if self.folder is not None:
      return (SourceStore.open, (self.folder,))
    return (SourceStore, (self.images, self._labels))

  def __len__(self) -> int:
    return len(self.images)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])

  @property
  def n_segments(self) -> tuple[int, ...]:
    return tuple(sorted(self._labels))

  def labels(self, n_segments: int) -> np.ndarray:
    """(N, S, S) SLIC ids of every source for `n_segments`."""
    if n_segments not in self._labels:
      raise KeyError(f'the source store holds labels for n_segments {self.n_segments}, '
                     f'not {n_segments}')
    return self._labels[n_segments]


def _fingerprint(parts: Sequence[str]) -> str:
  digest = hashlib.sha256()
  for part in parts:
    digest.update(part.encode() + b'\n')
  return digest.hexdigest()[:_FINGERPRINT_CHARS]


@dataclasses.dataclass(frozen=True)
class _Contents:
  """What a store holds: a name, what identifies it, and how to make each image."""

  name: str
  identity: tuple[str, ...]
  inputs: Sequence[Any]  # file paths or uint8 images
  to_image: Callable[[Any], np.ndarray]  # one input -> uint8 (S, S, 3); picklable


def _folder_contents(source_dir: str, image_size: int) -> _Contents:
  root = os.path.abspath(source_dir)
  paths = sources_lib.image_files(source_dir)
  identity = []
  for path in paths:
    stat = os.stat(path)
    identity.append(f'{os.path.relpath(path, root)}\0{stat.st_size}\0{stat.st_mtime_ns}')
  return _Contents(os.path.basename(root.rstrip(os.sep)) or 'sources', tuple(identity), paths,
                   functools.partial(image_files.read_rgb, size=image_size))


def _array_contents(name: str, images: np.ndarray) -> _Contents:
  digest = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
  return _Contents(name, (f'{images.shape} {digest}',), list(images), np.asarray)


def _labelled(item: Any, to_image: Callable[[Any], np.ndarray], n_segments: Sequence[int],
              compactness: float, sigma: float) -> tuple[np.ndarray, list[np.ndarray]]:
  image = to_image(item)
  labels = [superpixel.slic_labels(image, n, compactness, sigma).astype(LABEL_DTYPE)
            for n in n_segments]
  return image, labels


def _write(folder: str, contents: _Contents, image_size: int, n_segments: Sequence[int],
           compactness: float, sigma: float, num_processes: int) -> None:
  """Decodes and labels every image of `contents` into .npy files in `folder`."""
  count = len(contents.inputs)
  images = np.lib.format.open_memmap(
      os.path.join(folder, 'images.npy'), 'w+', np.uint8, (count, image_size, image_size, 3))
  labels = [np.lib.format.open_memmap(
      os.path.join(folder, f'labels_n{n}.npy'), 'w+', LABEL_DTYPE,
      (count, image_size, image_size)) for n in n_segments]
  work = functools.partial(_labelled, to_image=contents.to_image, n_segments=n_segments,
                           compactness=compactness, sigma=sigma)
  start = time.perf_counter()
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(num_processes, mp_context=context) as pool:
    results = pool.map(work, contents.inputs,
                       chunksize=max(1, min(16, count // (4 * num_processes))))
    for i, (image, image_labels) in enumerate(results):
      images[i] = image
      for array, label in zip(labels, image_labels):
        array[i] = label
      done = i + 1
      if done == count or (count >= 100 and done % (count // 10) == 0):
        logging.info('%s: %d/%d images decoded and segmented (%.0f s)',
                     contents.name, done, count, time.perf_counter() - start)
  for array in [images] + labels:
    array.flush()
  del images, labels


def _open_or_build(contents: _Contents, image_size: int, n_segments: Sequence[int],
                   compactness: float, sigma: float, cache_dir: str,
                   num_processes: int) -> SourceStore:
  n_segments = sorted(set(n_segments))
  settings = (f'v{STORE_VERSION}', f'size {image_size}', f'n_segments {n_segments}',
              f'compactness {compactness:g}', f'sigma {sigma:g}')
  folder = os.path.join(cache_dir, _SUBDIR, f'{contents.name}-{image_size}px-'
                        f'{_fingerprint(settings + contents.identity)}')
  if os.path.isdir(folder):
    return SourceStore.open(folder)
  parent = os.path.dirname(folder)
  os.makedirs(parent, exist_ok=True)
  logging.info('building the source store %s (once per machine)', folder)
  incomplete = tempfile.mkdtemp(prefix='incomplete.', dir=parent)
  try:
    _write(incomplete, contents, image_size, n_segments, compactness, sigma,
           max(1, num_processes))
    try:
      os.rename(incomplete, folder)
    except OSError:
      if not os.path.isdir(folder):
        raise
      logging.info('another process built %s first; using its copy', folder)
  finally:
    if os.path.isdir(incomplete):
      shutil.rmtree(incomplete)
  return SourceStore.open(folder)


def build_source_store(source_dir: str, image_size: int, n_segments: Sequence[int],
                       compactness: float, sigma: float, cache_dir: str,
                       num_processes: int) -> SourceStore:
  """Opens the store of the anomaly sources, building it first if needed.

  Args:
    source_dir: folder searched recursively for images (see
      sources.load_anomaly_sources); '' selects the built-in set.
    image_size: side every source is resized to.
    n_segments: the SLIC segment counts to label each source with.
    compactness: SLIC compactness.
    sigma: SLIC pre-smoothing.
    cache_dir: the cache root; the store goes under `<cache_dir>/sources/`.
    num_processes: processes that decode and segment the sources.

  Raises:
    ValueError: the folder does not exist or holds no images.
    DatasetError: a source file cannot be decoded (the message names it).
  """
  if source_dir:
    contents = _folder_contents(source_dir, image_size)
  else:
    contents = _Contents('builtin', (f'builtin scikit-image {skimage.__version__}',),
                         sources_lib.load_anomaly_sources('', image_size), np.asarray)
  return _open_or_build(contents, image_size, n_segments, compactness, sigma, cache_dir,
                        num_processes)


def build_image_store(images: np.ndarray, name: str, n_segments: Sequence[int],
                      compactness: float, sigma: float, cache_dir: str,
                      num_processes: int) -> SourceStore:
  """Opens the store of uint8 (N, S, S, 3) images, building it first if needed.

  For images that are already decoded, such as a category's normal training
  images used as anomaly sources; the store is identified by their content.
  """
  if images.ndim != 4 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
    raise ValueError(f'images must be uint8 (N, S, S, 3); got {images.dtype} {images.shape}')
  return _open_or_build(_array_contents(name, images), images.shape[1], n_segments,
                        compactness, sigma, cache_dir, num_processes)
