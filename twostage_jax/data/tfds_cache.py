"""A tensorflow-datasets cache of MVTec-layout categories, built from the folders.

Decoding and resizing full-size PNG files is the slow part of loading a
category. The first run writes one split of a category, resized uint8 images
(and for the test split bool masks), as array_record files; every later run
reads them back by random access (`as_data_source`), without TensorFlow.

The folder reader (mvtec.py) stays the source: it lists the files, so a
missing folder or mask raises its DatasetError before anything is built, and
it decodes them, so the cache holds exactly what it returns. Each cached
split lives in its own folder, named by the category, split, image size and
a fingerprint of the listed files (relative paths and contents):

    <cache_dir>/tfds/<category>-<split>-<size>px-<fingerprint>/mvtec_layout/<version>/

so a changed image size or an edited folder builds a new cache rather than
reusing a wrong one (old ones stay until the folder is deleted). Bump
`MvtecLayout.VERSION` whenever the folder reader's output changes. The
variant is a folder rather than a tfds builder config because tfds warns on
every run about configs the builder class does not declare in advance.

Several processes may build the same split at once: tfds writes each into its
own `incomplete.*` folder and renames it into place; the rename of every
process but the first fails, and those processes then read the winner's copy.

A finished cache that cannot be read back (a truncated array_record file, a
deleted dataset_info.json) is moved away, with a warning naming the damaged
file, and built again; where that fails, a DatasetError names the file.
"""

from collections.abc import Callable, Sequence
import dataclasses
import hashlib
import os
import shutil
import time
from typing import Any, ClassVar
import uuid

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from twostage_jax.data import mvtec
from twostage_jax.data.errors import DatasetError

_SUBDIR = 'tfds'
_FINGERPRINT_CHARS = 12
_INFO_FILE = 'dataset_info.json'


@dataclasses.dataclass(frozen=True)
class _Source:
  """One split of one category at one size, as the folder reader lists it.

  Attributes:
    folder: the category folder; `files` are relative to it.
    category: the category's name.
    split: 'train' or 'test'.
    image_size: side of the stored images and masks.
    files: what the reader reads: train image paths, or the test listing.
  """
  folder: str
  category: str
  split: str
  image_size: int
  files: tuple[str, ...] | mvtec.TestFiles

  def paths(self) -> tuple[str, ...]:
    """Every file the split reads (images, then masks), relative to `folder`."""
    if isinstance(self.files, mvtec.TestFiles):
      masks = tuple(path for path in self.files.mask_paths if path is not None)
      return self.files.paths + masks
    return self.files

  def num_examples(self) -> int:
    """How many examples the split's cache holds: one per listed image."""
    if isinstance(self.files, mvtec.TestFiles):
      return len(self.files.paths)
    return len(self.files)

  def fingerprint(self) -> str:
    """A short hash of the files' relative paths and contents.

    Contents, not sizes and mtimes: a file replaced by another of the same
    size whose mtime was kept (`cp -p`, `rsync -t`, `os.utime`) must build a
    new cache. BLAKE2b runs at several hundred MB/s, a small cost next to
    decoding the same files.
    """
    digest = hashlib.blake2b()
    for path in self.paths():
      with open(os.path.join(self.folder, path), 'rb') as f:
        content = hashlib.blake2b(f.read()).digest()
      digest.update(path.encode() + b'\0' + content)
    return digest.hexdigest()[:_FINGERPRINT_CHARS]


class MvtecLayout(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One split of an MVTec-layout category, as the folder reader returns it.

  Examples keep the reader's file order (`disable_shuffling`). Images and
  masks are stored as raw bytes, so reading them needs no image decoding.
  Train examples hold no mask or defect type: they would always be empty
  and 'good', and skipping them makes reading the split faster.
  """

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {
      '1.0.0': 'Resized uint8 images and paths; test masks and defect types.',
      '1.1.0': 'Any non-zero mask value is anomalous; float images in [0, 1].'}

  def __init__(self, *, data_dir: str, source: _Source):
    self._source = source
    super().__init__(data_dir=data_dir, file_format='array_record')

  def _info(self) -> tfds.core.DatasetInfo:
    size = self._source.image_size
    features = {
        'image': tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8,
                                      encoding='bytes'),
        'path': tfds.features.Text(doc='relative to the category folder'),
    }
    if self._source.split == 'test':
      features['mask'] = tfds.features.Tensor(shape=(size, size), dtype=np.bool_,
                                              encoding='bytes')
      features['defect_type'] = tfds.features.Text(doc="'good' for normal images")
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f'{self._source.split} split of {self._source.folder} at '
                     f'{size}x{size}, read by twostage_jax.data.mvtec'),
        features=tfds.features.FeaturesDict(features),
        disable_shuffling=True)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager
                        ) -> dict[str, Any]:
    del dl_manager  # Nothing is downloaded: the source is a local folder.
    return {self._source.split: self._generate_examples()}

  def _generate_examples(self):
    source = self._source
    if source.split == 'train':
      train = mvtec.read_train_images(source.folder, source.files,
                                      source.image_size)
      for index, path in enumerate(source.files):
        yield index, {'image': train[index], 'path': path}
    else:
      test = mvtec.read_test_set(source.folder, source.files, source.image_size)
      for index, path in enumerate(test.paths):
        yield index, {'image': test.images[index], 'mask': test.masks[index],
                      'path': path, 'defect_type': test.defect_types[index]}

  def _log_download_bytes(self) -> None:
    """Silences tfds's 'Downloading and preparing' line: nothing downloads."""

  def _log_download_done(self) -> None:
    """Silences tfds's 'downloaded and prepared' line; `_prepared` logs."""


def _list_source(data_dir: str, category: str, split: str,
                 image_size: int) -> _Source:
  """The split's files, listed by the folder reader (its errors surface)."""
  if split == 'train':
    files = mvtec.train_files(data_dir, category)
  else:
    files = mvtec.test_files(data_dir, category)
  return _Source(folder=mvtec.category_dir(data_dir, category),
                 category=category, split=split, image_size=image_size,
                 files=files)


def cache_root(cache_dir: str) -> str:
  """The folder holding every tfds cache under a resolved `cache_dir`."""
  return os.path.join(cache_dir, _SUBDIR)


class _DamagedCache(Exception):
  """A finished cache that cannot be read back.

  Attributes:
    path: the damaged file (or folder).
    problem: what is wrong with it, a phrase following the path.
    version_dir: the finished cache folder holding it.
  """

  def __init__(self, path: str, problem: str, version_dir: str):
    super().__init__(f'{path} {problem}')
    self.path = path
    self.problem = problem
    self.version_dir = version_dir


def _describe(error: Exception) -> str:
  """'Type: message' on one line, for messages that may span several."""
  return f'{type(error).__name__}: {" ".join(str(error).split())}'


def _builder(data_dir: str, source: _Source) -> MvtecLayout:
  """The builder of the cache in `data_dir`, reading its info when finished.

  Raises:
    _DamagedCache: the finished cache's info file cannot be parsed.
  """
  version_dir = os.path.join(data_dir, MvtecLayout.name,
                             str(MvtecLayout.VERSION))
  try:
    return MvtecLayout(data_dir=data_dir, source=source)
  except Exception as e:  # pylint: disable=broad-exception-caught
    if not os.path.isdir(version_dir):
      raise
    raise _DamagedCache(os.path.join(version_dir, _INFO_FILE),
                        f'cannot be parsed ({_describe(e)})', version_dir) from e


def _prepared(source: _Source, cache_dir: str) -> MvtecLayout:
  """The builder of `source`'s cache, built first if it does not exist yet.

  Raises:
    _DamagedCache: the cache exists but its info file cannot be parsed.
  """
  root = cache_root(cache_dir)
  name = (f'{source.category}-{source.split}-{source.image_size}px-'
          f'{source.fingerprint()}')
  data_dir = os.path.join(root, name)
  builder = _builder(data_dir, source)
  # The version folder appears only when tfds renames a finished build into
  # place, so it exists exactly when the cache is complete.
  if os.path.isdir(builder.data_dir):
    return builder
  logging.info('building the tfds cache of %s (%s) at %dx%d in %s (once) ...',
               source.category, source.split, source.image_size,
               source.image_size, data_dir)
  start = time.perf_counter()
  tfds.disable_progress_bar()  # The log lines above and below say enough.
  try:
    builder.download_and_prepare(
        download_dir=os.path.join(root, 'downloads'),
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except OSError:
    # Another process renamed its finished copy into place first.
    builder = _builder(data_dir, source)
    if not os.path.isdir(builder.data_dir):
      raise
    logging.info('another process built the tfds cache in %s first; reading '
                 'its copy', data_dir)
    return builder
  logging.info('built the tfds cache of %s (%s): %d images in %.1f s',
               source.category, source.split,
               builder.info.splits[source.split].num_examples,
               time.perf_counter() - start)
  return builder


def _read_examples(examples: Sequence[dict[str, Any]],
                   damaged: Callable[[int, Exception], _DamagedCache]
                   ) -> dict[str, np.ndarray | list[str]]:
  """Every feature of every example, in order: arrays stacked, texts decoded.

  Examples are read one at a time into preallocated arrays rather than in
  one `__getitems__` batch: a batch holds every decompressed record at once,
  while here each record's memory is reused for the next, which measured
  about twice as fast.

  Raises:
    _DamagedCache: `damaged(index, error)` for the first unreadable example.
  """
  columns = {}
  for index in range(len(examples)):
    try:
      example = examples[index]
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise damaged(index, e) from e
    for key, value in example.items():
      if isinstance(value, bytes):
        columns.setdefault(key, []).append(value.decode())
      else:
        if key not in columns:
          columns[key] = np.empty((len(examples), *value.shape), value.dtype)
        columns[key][index] = value
  return columns


def _read_cached(builder: MvtecLayout, source: _Source
                 ) -> dict[str, np.ndarray | list[str]]:
  """Every example of a finished cache, or the file that keeps it unreadable.

  tfds reports damage without naming a file: a deleted dataset_info.json
  reads as a dataset with no splits, a truncated array_record file as
  records of None. So the info and shard files are checked first, and a
  failed read is traced to the shard holding that example.

  Raises:
    _DamagedCache: naming the damaged file.
  """
  version_dir = builder.data_dir
  info_path = os.path.join(version_dir, _INFO_FILE)
  split = source.split
  if split not in builder.info.splits:
    problem = ('is missing' if not os.path.isfile(info_path)
               else f'lists no {split} split')
    raise _DamagedCache(info_path, problem, version_dir)
  split_info = builder.info.splits[split]
  if split_info.num_examples != source.num_examples():
    raise _DamagedCache(
        info_path, f'lists {split_info.num_examples} examples where the folder '
        f'has {source.num_examples()} images', version_dir)
  shards = [os.fspath(path) for path in split_info.filepaths]
  for shard in shards:
    if not os.path.isfile(shard):
      raise _DamagedCache(shard, 'is missing', version_dir)
  ends = np.cumsum(split_info.shard_lengths)

  def damaged(index: int, error: Exception) -> _DamagedCache:
    shard = shards[int(np.searchsorted(ends, index, side='right'))]
    return _DamagedCache(
        shard, f'has an unreadable example {index} ({_describe(error)})',
        version_dir)

  logging.info('reading %s (%s) from the tfds cache %s', source.category,
               split, version_dir)
  try:
    examples = builder.as_data_source(split=split)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _DamagedCache(version_dir, f'cannot be opened ({_describe(e)})',
                        version_dir) from e
  return _read_examples(examples, damaged)


def _discard(damage: _DamagedCache, cache_dir: str) -> None:
  """Moves a damaged cache away and deletes it, so that it is built again.

  The rename is atomic, so no reader sees a half-deleted cache; when it
  finds nothing, another process already moved the cache away.

  Raises:
    DatasetError: the cache cannot be moved away, so it cannot be rebuilt.
  """
  logging.warning('the tfds cache file %s %s; deleting %s and building it '
                  'again', damage.path, damage.problem, damage.version_dir)
  trash = os.path.join(cache_root(cache_dir), f'damaged-{uuid.uuid4().hex}')
  try:
    os.rename(damage.version_dir, trash)
  except FileNotFoundError:
    return
  except OSError as e:
    raise DatasetError(
        f'the tfds cache file {damage.path} {damage.problem}, and its cache '
        f'{damage.version_dir} cannot be removed to rebuild it ({e}); delete '
        'it or set --config.data_cache=none') from e
  shutil.rmtree(trash, ignore_errors=True)


def _read_split(data_dir: str, category: str, split: str, image_size: int,
                cache_dir: str) -> dict[str, np.ndarray | list[str]]:
  """Every example of the split in file order, from its cache.

  Raises:
    DatasetError: the folder reader's errors, or a cache that is still
      damaged after rebuilding it (naming the file).
  """
  source = _list_source(data_dir, category, split, image_size)
  try:
    return _read_cached(_prepared(source, cache_dir), source)
  except _DamagedCache as damage:
    _discard(damage, cache_dir)
  try:
    return _read_cached(_prepared(source, cache_dir), source)
  except _DamagedCache as damage:
    raise DatasetError(
        f'the tfds cache file {damage.path} {damage.problem}, even after '
        f'rebuilding it; delete {damage.version_dir} or set '
        '--config.data_cache=none') from damage


def load_train_images(data_dir: str, category: str, image_size: int,
                      cache_dir: str) -> np.ndarray:
  """`mvtec.load_train_images`, read from the cache under `cache_dir`."""
  return _read_split(data_dir, category, 'train', image_size, cache_dir)['image']


def load_test_set(data_dir: str, category: str, image_size: int,
                  cache_dir: str) -> mvtec.TestSet:
  """`mvtec.load_test_set`, read from the cache under `cache_dir`."""
  columns = _read_split(data_dir, category, 'test', image_size, cache_dir)
  return mvtec.TestSet.from_examples(
      images=columns['image'], masks=columns['mask'], paths=columns['path'],
      defect_types=columns['defect_type'])
