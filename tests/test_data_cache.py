"""The tfds cache of a category returns exactly what the folder reader returns."""

import glob
import logging
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image
import pytest

from configs import mvtec as mvtec_config
from twostage_jax import data
from twostage_jax.data import mvtec
from twostage_jax.data import tfds_cache

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SIZE = 64  # Side of the PNG files; the tests read them at other sizes.


def _save(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(array)
  image.convert(mode or image.mode).save(path)


def _noise(rng):
  return rng.integers(0, 256, (_SIZE, _SIZE, 3), dtype=np.uint8)


def _make_category(root, category='widget'):
  """A small MVTec-layout category of random images, one grayscale, one RGBA."""
  rng = np.random.default_rng(0)
  base = os.path.join(root, category)
  for i in range(4):
    _save(os.path.join(base, 'train', 'good', f'{i:03d}.png'), _noise(rng),
          'L' if i == 2 else None)
  _save(os.path.join(base, 'test', 'good', '000.png'), _noise(rng))
  _save(os.path.join(base, 'test', 'good', '001.png'), _noise(rng), 'RGBA')
  for defect, count in (('crack', 2), ('bent', 1)):
    for i in range(count):
      _save(os.path.join(base, 'test', defect, f'{i:03d}.png'), _noise(rng))
      mask = np.zeros((_SIZE, _SIZE), dtype=np.uint8)
      mask[10 + 5 * i:40, 8:30 + i] = 255
      _save(os.path.join(base, 'ground_truth', defect, f'{i:03d}_mask.png'), mask)
  return str(root)


def _config(data_dir, cache_dir, image_size=32, data_cache='tfds', category='widget'):
  config = mvtec_config.get_config()
  config.data_dir = data_dir
  config.cache_dir = str(cache_dir)
  config.category = category
  config.image_size = image_size
  config.data_cache = data_cache
  return config


def _cached_splits(cache_dir, split):
  """The finished cache folders of `split` under cache_dir."""
  return sorted(glob.glob(os.path.join(
      tfds_cache.cache_root(str(cache_dir)), f'*-{split}-*', 'mvtec_layout', '*')))


def _assert_same_test_set(actual, expected):
  np.testing.assert_array_equal(actual.images, expected.images)
  np.testing.assert_array_equal(actual.masks, expected.masks)
  np.testing.assert_array_equal(actual.labels, expected.labels)
  assert actual.images.dtype == np.uint8 and actual.masks.dtype == np.bool_
  assert actual.labels.dtype == np.int8
  assert actual.paths == expected.paths
  assert actual.defect_types == expected.defect_types


@pytest.fixture
def dataset(tmp_path):
  """(data_dir, cache_dir) of a fresh synthetic category."""
  return _make_category(tmp_path / 'data'), tmp_path / 'cache'


def test_cache_equals_the_folder_reader(dataset):
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir)
  train = data.category_train_images(config)
  test = data.category_test_set(config)
  assert len(_cached_splits(cache_dir, 'train')) == 1
  assert len(_cached_splits(cache_dir, 'test')) == 1
  expected_train = mvtec.load_train_images(data_dir, 'widget', 32)
  assert train.dtype == np.uint8 and train.shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(train, expected_train)
  expected_test = mvtec.load_test_set(data_dir, 'widget', 32)
  _assert_same_test_set(test, expected_test)
  assert test.paths[0] == 'test/bent/000.png' and test.labels.tolist() == [1, 1, 1, 0, 0]
  assert test.masks[:3].any(axis=(1, 2)).all()


def test_second_read_comes_from_the_cache(dataset, monkeypatch):
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir)
  train = data.category_train_images(config)
  test = data.category_test_set(config)

  def fail(*args, **kwargs):
    raise AssertionError('the image files were decoded again')

  monkeypatch.setattr(mvtec, 'read_train_images', fail)
  monkeypatch.setattr(mvtec, 'read_test_set', fail)
  np.testing.assert_array_equal(data.category_train_images(config), train)
  _assert_same_test_set(data.category_test_set(config), test)
  assert len(_cached_splits(cache_dir, 'train')) == 1


def test_another_image_size_builds_another_cache(dataset):
  data_dir, cache_dir = dataset
  small = data.category_train_images(_config(data_dir, cache_dir, image_size=32))
  large = data.category_train_images(_config(data_dir, cache_dir, image_size=48))
  assert small.shape == (4, 32, 32, 3) and large.shape == (4, 48, 48, 3)
  np.testing.assert_array_equal(large, mvtec.load_train_images(data_dir, 'widget', 48))
  folders = _cached_splits(cache_dir, 'train')
  assert len(folders) == 2
  assert {'32px', '48px'} == {
      os.path.basename(os.path.dirname(os.path.dirname(f))).split('-')[2] for f in folders}


def test_edited_source_builds_a_new_cache(dataset):
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir)
  before_train = data.category_train_images(config)
  before_test = data.category_test_set(config)
  category = os.path.join(data_dir, 'widget')
  _save(os.path.join(category, 'train', 'good', '001.png'),
        np.full((_SIZE, _SIZE, 3), 7, dtype=np.uint8))
  mask = os.path.join(category, 'ground_truth', 'crack', '000_mask.png')
  _save(mask, np.full((_SIZE, _SIZE), 255, dtype=np.uint8))
  stat = os.stat(mask)  # Same-size rewrites must count even within one mtime tick.
  os.utime(mask, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))

  after_train = data.category_train_images(config)
  after_test = data.category_test_set(config)
  assert (after_train[1] == 7).all() and not (before_train[1] == 7).all()
  np.testing.assert_array_equal(after_train[[0, 2, 3]], before_train[[0, 2, 3]])
  crack = after_test.paths.index('test/crack/000.png')
  assert after_test.masks[crack].all() and not before_test.masks[crack].all()
  _assert_same_test_set(after_test, mvtec.load_test_set(data_dir, 'widget', 32))
  assert len(_cached_splits(cache_dir, 'train')) == 2
  assert len(_cached_splits(cache_dir, 'test')) == 2


def test_data_cache_none_reads_the_folders(dataset, monkeypatch):
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir, data_cache='none')

  def fail(*args, **kwargs):
    raise AssertionError('the tfds cache was used')

  monkeypatch.setattr(tfds_cache, 'load_train_images', fail)
  monkeypatch.setattr(tfds_cache, 'load_test_set', fail)
  np.testing.assert_array_equal(data.category_train_images(config),
                                mvtec.load_train_images(data_dir, 'widget', 32))
  _assert_same_test_set(data.category_test_set(config),
                        mvtec.load_test_set(data_dir, 'widget', 32))
  assert not os.path.exists(tfds_cache.cache_root(str(cache_dir)))


def test_unknown_data_cache_value_is_named(dataset):
  config = _config(*dataset, data_cache='lmdb')
  with pytest.raises(ValueError, match="config.data_cache = 'lmdb' must be one of"):
    data.category_train_images(config)


def test_missing_category_raises_the_readers_error(dataset):
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir, category='gadget')
  with pytest.raises(data.DatasetError, match=r"category 'gadget' not found.*widget"):
    data.category_train_images(config)
  with pytest.raises(data.DatasetError, match=r"category 'gadget' not found"):
    data.category_test_set(config)
  assert not _cached_splits(cache_dir, 'train')


def test_missing_mask_and_unreadable_image_name_the_file(dataset):
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir)
  category = os.path.join(data_dir, 'widget')
  os.remove(os.path.join(category, 'ground_truth', 'bent', '000_mask.png'))
  with pytest.raises(data.DatasetError, match='test/bent/000.png has no mask'):
    data.category_test_set(config)
  with open(os.path.join(category, 'train', 'good', '003.png'), 'wb') as f:
    f.write(b'junk')
  # This one is found while the cache is being built, inside tfds.
  with pytest.raises(data.DatasetError, match=r'cannot read image file .*003\.png'):
    data.category_train_images(config)
  assert not _cached_splits(cache_dir, 'train') and not _cached_splits(cache_dir, 'test')


def test_demo_dataset_goes_through_the_cache(tmp_path):
  config = _config('', tmp_path / 'cache', category='weave')
  config.demo.update(num_train=2, num_test_good=1, num_test_per_defect=1, image_size=32)
  train = data.category_train_images(config)
  test = data.category_test_set(config)
  assert len(_cached_splits(tmp_path / 'cache', 'train')) == 1
  demo_dir = data.resolve_data_dir(config)
  np.testing.assert_array_equal(train, mvtec.load_train_images(demo_dir, 'weave', 32))
  _assert_same_test_set(test, mvtec.load_test_set(demo_dir, 'weave', 32))


def test_a_process_losing_the_build_race_reads_the_winners_cache(dataset, monkeypatch):
  """Another build finishes while this one is generating; both must end well."""
  data_dir, cache_dir = dataset
  read = mvtec.read_train_images
  calls = []

  def read_after_a_rival_finished(*args):
    calls.append(args)
    if len(calls) == 1:  # The rival's build runs to the end inside ours.
      tfds_cache.load_train_images(data_dir, 'widget', 32, str(cache_dir))
    return read(*args)

  monkeypatch.setattr(mvtec, 'read_train_images', read_after_a_rival_finished)
  train = tfds_cache.load_train_images(data_dir, 'widget', 32, str(cache_dir))
  assert len(calls) == 2  # Both builds ran, so the second rename lost.
  np.testing.assert_array_equal(train, mvtec.load_train_images(data_dir, 'widget', 32))
  versions = glob.glob(os.path.join(tfds_cache.cache_root(str(cache_dir)), '*',
                                    'mvtec_layout', '*'))
  assert len(versions) == 1
  assert os.path.basename(versions[0]) == str(tfds_cache.MvtecLayout.VERSION)


def test_tensorflow_is_never_imported(dataset):
  data_dir, cache_dir = dataset
  script = textwrap.dedent(f"""
      import sys
      from twostage_jax.data import tfds_cache
      for _ in range(2):  # Build, then read the finished cache.
        tfds_cache.load_train_images({data_dir!r}, 'widget', 32, {str(cache_dir)!r})
        tfds_cache.load_test_set({data_dir!r}, 'widget', 32, {str(cache_dir)!r})
      print('tensorflow' in sys.modules, 'tensorflow_datasets' in sys.modules)
      """)
  result = subprocess.run([sys.executable, '-c', script], cwd=_ROOT, capture_output=True,
                          text=True, check=True)
  assert result.stdout.split() == ['False', 'True']
  assert len(_cached_splits(cache_dir, 'test')) == 1


def _uncompressed_png(path, value):
  """A PNG whose byte size depends only on its shape, whatever its pixels."""
  Image.fromarray(np.full((_SIZE, _SIZE, 3), value, dtype=np.uint8)).save(
      path, compress_level=0)


def test_same_size_replacement_with_restored_mtime_builds_a_new_cache(dataset):
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir)
  path = os.path.join(data_dir, 'widget', 'train', 'good', '001.png')
  _uncompressed_png(path, 10)
  before = os.stat(path)
  assert (data.category_train_images(config)[1] == 10).all()
  _uncompressed_png(path, 200)
  os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
  after = os.stat(path)
  assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
  assert (data.category_train_images(config)[1] == 200).all()
  assert len(_cached_splits(cache_dir, 'train')) == 2


def test_touching_a_file_keeps_the_cache(dataset, monkeypatch):
  """Only contents count: a new mtime alone (a copy, a checkout) rebuilds nothing."""
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir)
  train = data.category_train_images(config)
  path = os.path.join(data_dir, 'widget', 'train', 'good', '001.png')
  os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**10))

  def fail(*args):
    raise AssertionError('the cache was rebuilt for a new mtime alone')

  monkeypatch.setattr(mvtec, 'read_train_images', fail)
  np.testing.assert_array_equal(data.category_train_images(config), train)
  assert len(_cached_splits(cache_dir, 'train')) == 1


def _shard(version_dir):
  return glob.glob(os.path.join(version_dir, '*.array_record-*'))[0]


def _truncate_shard(version_dir):
  path = _shard(version_dir)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  return path


def _delete_shard(version_dir):
  path = _shard(version_dir)
  os.remove(path)
  return path


def _delete_info(version_dir):
  path = os.path.join(version_dir, 'dataset_info.json')
  os.remove(path)
  return path


def _truncate_info(version_dir):
  path = os.path.join(version_dir, 'dataset_info.json')
  with open(path, 'r+b') as f:
    f.truncate(40)
  return path


_DAMAGES = [_truncate_shard, _delete_shard, _delete_info, _truncate_info]


@pytest.mark.parametrize('damage', _DAMAGES)
def test_damaged_cache_is_rebuilt_with_a_warning(dataset, damage, caplog):
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir)
  train = data.category_train_images(config)
  test = data.category_test_set(config)
  damaged = [damage(_cached_splits(cache_dir, split)[0]) for split in ('train', 'test')]
  with caplog.at_level(logging.WARNING):
    np.testing.assert_array_equal(data.category_train_images(config), train)
    _assert_same_test_set(data.category_test_set(config), test)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 2
  for path, warning in zip(damaged, warnings):
    assert warning.startswith(f'the tfds cache file {path} ')
    assert 'building it again' in warning
  for split in ('train', 'test'):
    assert len(_cached_splits(cache_dir, split)) == 1
  assert not glob.glob(os.path.join(tfds_cache.cache_root(str(cache_dir)), 'damaged-*'))


@pytest.mark.parametrize('damage', [_truncate_shard, _delete_info])
def test_damaged_cache_that_cannot_be_removed_names_the_file(dataset, damage, monkeypatch):
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir)
  data.category_train_images(config)
  path = damage(_cached_splits(cache_dir, 'train')[0])

  def refuse(*args):
    raise PermissionError(13, 'Permission denied', args[0])

  monkeypatch.setattr(os, 'rename', refuse)
  with pytest.raises(data.DatasetError, match=f'the tfds cache file {re.escape(path)} ') as error:
    data.category_train_images(config)
  assert 'cannot be removed to rebuild it' in str(error.value)
  assert 'data_cache=none' in str(error.value)


def test_cache_damaged_again_after_rebuilding_names_the_file(dataset, monkeypatch):
  data_dir, cache_dir = dataset
  config = _config(data_dir, cache_dir)
  prepared = tfds_cache._prepared  # pylint: disable=protected-access
  damaged = []

  def prepare_then_damage(*args):
    builder = prepared(*args)
    damaged.append(_truncate_shard(builder.data_dir))
    return builder

  monkeypatch.setattr(tfds_cache, '_prepared', prepare_then_damage)
  with pytest.raises(data.DatasetError, match='even after rebuilding it') as error:
    data.category_train_images(config)
  assert len(damaged) == 2
  assert str(error.value).startswith(f'the tfds cache file {damaged[1]} has an unreadable')
