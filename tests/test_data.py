"""Tests of dataset reading: image decoding, MVTec layout folders, demo set."""

import os
import re
import shutil

import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import mvtec as mvtec_config
from twostage_jax import data
from twostage_jax.data import cache
from twostage_jax.data import demo
from twostage_jax.data import images

_REAL_DATA_DIR = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data',
    'mvtec_ad')


def _save(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = Image.fromarray(array)
  if mode is not None:
    image = image.convert(mode)
  image.save(path)
  return str(path)


def _flat(value, size=32):
  """An RGB image of one colour; `value` tells the images apart."""
  return np.full((size, size, 3), value, dtype=np.uint8)


def _mask(size=32, top=8, bottom=24):
  mask = np.zeros((size, size), dtype=np.uint8)
  mask[top:bottom, 4:20] = 255
  return mask


def _make_category(root, category='widget', size=32):
  """A small MVTec-layout category with deliberately awkward files.

  Train files are written out of order; one train image is grayscale and one
  test image RGBA; hidden files and non-images are mixed in.
  """
  base = os.path.join(root, category)
  for name, value in (('002.png', 30), ('000.png', 10), ('001.png', 20)):
    _save(os.path.join(base, 'train', 'good', name), _flat(value, size))
  _save(os.path.join(base, 'train', 'good', '003.png'), _flat(40, size), 'L')
  _save(os.path.join(base, 'train', 'good', '.hidden.png'), _flat(99, size))
  with open(os.path.join(base, 'train', 'good', 'notes.txt'), 'w') as f:
    f.write('not an image')
  _save(os.path.join(base, 'test', 'good', '000.png'), _flat(50, size))
  _save(os.path.join(base, 'test', 'good', '001.png'), _flat(60, size), 'RGBA')
  for defect, count in (('crack', 2), ('bent', 1)):
    for i in range(count):
      _save(os.path.join(base, 'test', defect, f'{i:03d}.png'),
            _flat(70 + i, size))
      _save(os.path.join(base, 'ground_truth', defect, f'{i:03d}_mask.png'),
            _mask(size, top=8 + i))
  return str(root)


# --- images.py ----------------------------------------------------------------


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'RGB'])
def test_read_rgb_converts_modes_to_rgb(tmp_path, mode):
  array = np.zeros((16, 16, 3), dtype=np.uint8)
  array[:, 8:] = 153  # In PIL's web palette, so 'P' keeps it exactly.
  path = _save(tmp_path / 'x.png', array, mode)
  rgb = images.read_rgb(path, 16)
  assert rgb.dtype == np.uint8 and rgb.shape == (16, 16, 3)
  np.testing.assert_array_equal(rgb, array)


def test_read_rgb_scales_16_bit(tmp_path):
  array = np.zeros((8, 8), dtype=np.uint16)
  array[:, 4:] = 65535
  path = _save(tmp_path / 'x.png', array)
  with Image.open(path) as image:
    assert image.mode.startswith('I')
  rgb = images.read_rgb(path, 8)
  assert rgb.shape == (8, 8, 3)
  assert rgb[:, :4].max() == 0 and rgb[:, 4:].min() == 255


def test_read_rgb_resizes_bilinear(tmp_path):
  array = np.random.default_rng(0).integers(0, 256, (40, 24, 3), np.uint8)
  path = _save(tmp_path / 'x.png', array)
  expected = np.asarray(Image.fromarray(array).resize(
      (16, 16), Image.Resampling.BILINEAR))
  np.testing.assert_array_equal(images.read_rgb(path, 16), expected)
  assert images.image_size_of(path) == (40, 24)


def test_read_mask_binarises_then_resizes(tmp_path):
  mask = np.zeros((8, 8), dtype=np.uint8)
  mask[:, :4] = 255
  mask[:, 4:6] = 100  # Not 255, still anomalous: any non-zero value is.
  path = _save(tmp_path / 'm.png', mask)
  small = images.read_mask(path, 4)
  assert small.dtype == bool and small.shape == (4, 4)
  np.testing.assert_array_equal(small, np.repeat([[1, 1, 1, 0]], 4, 0) > 0)
  full = images.read_mask(path, 8)
  np.testing.assert_array_equal(full, mask > 0)


def test_corrupt_file_raises_dataset_error(tmp_path):
  path = tmp_path / 'broken.png'
  path.write_bytes(b'\x89PNG garbage, not an image')
  with pytest.raises(data.DatasetError, match='broken.png'):
    images.read_rgb(str(path), 8)
  with pytest.raises(data.DatasetError, match='broken.png'):
    images.image_size_of(str(path))


def _box(size, top, bottom, left, right):
  box = np.zeros((size, size), dtype=bool)
  box[top:bottom, left:right] = True
  return box


@pytest.mark.parametrize('dtype', [np.uint8, np.uint16, np.float32, bool])
def test_read_mask_any_non_zero_value_is_anomalous(tmp_path, dtype):
  """0/1 masks (8-bit, 16-bit, float, 1-bit) read like MVTec's 0/255 ones."""
  mask = np.zeros((8, 8), dtype=dtype)
  mask[2:6, 2:6] = 1
  path = _save(tmp_path / ('m.tif' if dtype == np.float32 else 'm.png'), mask)
  np.testing.assert_array_equal(images.read_mask(path, 8), mask > 0)
  np.testing.assert_array_equal(images.read_mask(path, 4), _box(4, 1, 3, 1, 3))


def test_empty_mask_is_an_error(tmp_path):
  path = _save(tmp_path / 'blank_mask.png', np.zeros((8, 8), dtype=np.uint8))
  with pytest.raises(data.DatasetError, match=r'mask .*blank_mask\.png is empty'):
    images.read_mask(path, 8)


def _float_gradient(high):
  """A float32 (8, 8) image rising from 0 to `high` along the rows."""
  return np.repeat(np.linspace(0.0, high, 8, dtype=np.float32)[None], 8, axis=0)


@pytest.mark.parametrize('high', [1.0, 255.0])
def test_read_rgb_float_tiff(tmp_path, high):
  """[0, 1] float images scale to 0..255; larger values are 0..255 already."""
  path = _save(tmp_path / 'x.tif', _float_gradient(high))
  with Image.open(path) as image:
    assert image.mode == 'F'
  rgb = images.read_rgb(path, 8)
  expected = np.rint(_float_gradient(255.0)).astype(np.uint8)
  np.testing.assert_array_equal(rgb, np.stack([expected] * 3, axis=-1))


def test_float_tiffs_in_training_and_prediction(tmp_path):
  """Both read through `read_rgb`, so neither sees the float image as black."""
  data_dir = _make_category(tmp_path / 'data')
  train_good = os.path.join(data_dir, 'widget', 'train', 'good')
  os.remove(os.path.join(train_good, '003.png'))
  _save(os.path.join(train_good, '003.tif'),
        np.full((32, 32), 0.5, dtype=np.float32))
  train = data.load_train_images(data_dir, 'widget', 16)
  assert (train[3] == 128).all()
  predicted = data.load_image_folder(train_good, 16)
  assert predicted.paths[3].endswith('003.tif')
  assert (predicted.images[3] == 128).all()


def test_float_rgb_tiff_names_the_file_and_the_remedy(tmp_path):
  """PIL cannot hold three float channels: the error says so, not just 'cannot identify'."""
  tifffile = pytest.importorskip('tifffile')
  path = str(tmp_path / 'float_rgb.tif')
  tifffile.imwrite(path, np.full((8, 8, 3), 0.5, np.float32), photometric='rgb')
  for read in (lambda: images.read_rgb(path, 8), lambda: images.image_size_of(path)):
    with pytest.raises(data.DatasetError, match='float_rgb.tif') as error:
      read()
    assert 'save multi-channel float TIFFs as 8- or 16-bit' in str(error.value)


# --- mvtec.py -----------------------------------------------------------------


def test_load_train_images_sorted_rgb_resized(tmp_path):
  data_dir = _make_category(tmp_path)
  train = data.load_train_images(data_dir, 'widget', 16)
  assert train.dtype == np.uint8 and train.shape == (4, 16, 16, 3)
  np.testing.assert_array_equal(train[:, 0, 0, 0], [10, 20, 30, 40])


def test_load_test_set(tmp_path):
  data_dir = _make_category(tmp_path)
  test = data.load_test_set(data_dir, 'widget', 16)
  assert test.images.shape == (5, 16, 16, 3) and test.images.dtype == np.uint8
  assert test.masks.shape == (5, 16, 16) and test.masks.dtype == bool
  assert test.labels.dtype == np.int8
  assert test.paths == ('test/bent/000.png', 'test/crack/000.png',
                        'test/crack/001.png', 'test/good/000.png',
                        'test/good/001.png')
  assert test.defect_types == ('bent', 'crack', 'crack', 'good', 'good')
  np.testing.assert_array_equal(test.labels, [1, 1, 1, 0, 0])
  assert not test.masks[3:].any()
  expected = np.zeros((16, 16), dtype=bool)
  expected[4:12, 2:10] = True
  np.testing.assert_array_equal(test.masks[0], expected)
  np.testing.assert_array_equal(test.images[:, 0, 0, 0], [70, 70, 71, 50, 60])


def test_list_categories(tmp_path):
  _make_category(tmp_path, 'b')
  _make_category(tmp_path, 'a')
  os.makedirs(tmp_path / 'not_a_category')
  assert data.list_categories(str(tmp_path)) == ['a', 'b']


def test_missing_data_dir(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(data.DatasetError, match='does not exist') as error:
    data.load_train_images(missing, 'widget', 16)
  assert missing in str(error.value)


def test_missing_category_lists_existing(tmp_path):
  data_dir = _make_category(tmp_path)
  with pytest.raises(data.DatasetError, match='gadget') as error:
    data.load_test_set(data_dir, 'gadget', 16)
  assert 'widget' in str(error.value)
  assert os.path.join(data_dir, 'gadget') in str(error.value)


def test_no_training_images(tmp_path):
  os.makedirs(tmp_path / 'widget' / 'train' / 'good')
  with pytest.raises(data.DatasetError, match='no training images') as error:
    data.load_train_images(str(tmp_path), 'widget', 16)
  assert os.path.join('widget', 'train', 'good') in str(error.value)


def test_no_test_folder(tmp_path):
  _save(tmp_path / 'widget' / 'train' / 'good' / '000.png', _flat(1))
  with pytest.raises(data.DatasetError, match='no test images') as error:
    data.load_test_set(str(tmp_path), 'widget', 16)
  assert os.path.join('widget', 'test') in str(error.value)


def test_defective_image_without_mask(tmp_path):
  data_dir = _make_category(tmp_path)
  os.remove(tmp_path / 'widget' / 'ground_truth' / 'crack' / '001_mask.png')
  with pytest.raises(data.DatasetError, match='has no mask') as error:
    data.load_test_set(data_dir, 'widget', 16)
  message = str(error.value)
  assert os.path.join('test', 'crack', '001.png') in message
  assert os.path.join('ground_truth', 'crack', '001_mask.png') in message


def test_mask_size_differs_from_image(tmp_path):
  data_dir = _make_category(tmp_path)
  _save(tmp_path / 'widget' / 'ground_truth' / 'bent' / '000_mask.png',
        _mask(24))
  with pytest.raises(data.DatasetError, match='000_mask.png') as error:
    data.load_test_set(data_dir, 'widget', 16)
  message = str(error.value)
  assert os.path.join('test', 'bent', '000.png') in message
  assert '(24, 24)' in message and '(32, 32)' in message


def test_unreadable_image_in_category(tmp_path):
  data_dir = _make_category(tmp_path)
  (tmp_path / 'widget' / 'train' / 'good' / '001.png').write_bytes(b'junk')
  with pytest.raises(data.DatasetError, match='cannot read') as error:
    data.load_train_images(data_dir, 'widget', 16)
  assert os.path.join('train', 'good', '001.png') in str(error.value)


def test_list_categories_none_found_says_what_layout_it_expects(tmp_path):
  os.makedirs(tmp_path / 'photos' / 'good')
  with pytest.raises(data.DatasetError, match='no categories in') as error:
    data.list_categories(str(tmp_path))
  assert str(tmp_path) in str(error.value)
  assert os.path.join('<category>', 'train', 'good') in str(error.value)
  # A category folder given as data_dir: the message points at its parent.
  data_dir = _make_category(tmp_path / 'data')
  category = os.path.join(data_dir, 'widget')
  with pytest.raises(data.DatasetError,
                     match=f'set data_dir to its parent {re.escape(data_dir)}$'):
    data.list_categories(category)
  # Looking up a category there still lists the (no) categories, not this error.
  with pytest.raises(data.DatasetError, match=r"category 'x' not found.*: none\)"):
    data.load_train_images(str(tmp_path), 'x', 16)


@pytest.mark.parametrize('split,subfolder', [
    ('test', os.path.join('test', 'crack', 'sub')),
    ('test', os.path.join('test', 'good', 'more', 'deeper')),
    ('train', os.path.join('train', 'good', 'extra')),
])
def test_images_in_a_subfolder_are_an_error(tmp_path, split, subfolder):
  """The reader would leave them out of training or evaluation unnoticed."""
  data_dir = _make_category(tmp_path)
  nested = os.path.join(data_dir, 'widget', subfolder)
  _save(os.path.join(nested, '001.png'), _flat(1))
  load = data.load_test_set if split == 'test' else data.load_train_images
  top = os.path.join(data_dir, 'widget', *subfolder.split(os.sep)[:3])
  with pytest.raises(data.DatasetError, match=f'images in subfolder {re.escape(top)} ') as error:
    load(data_dir, 'widget', 16)
  assert 'would be left out' in str(error.value)


def test_subfolders_without_images_are_fine(tmp_path):
  data_dir = _make_category(tmp_path)
  os.makedirs(tmp_path / 'widget' / 'test' / 'crack' / 'notes')
  (tmp_path / 'widget' / 'test' / 'crack' / 'notes' / 'readme.txt').write_text('x')
  _save(tmp_path / 'widget' / 'test' / 'crack' / '.cache' / '000.png', _flat(1))
  assert len(data.load_test_set(data_dir, 'widget', 16).paths) == 5


def test_images_directly_in_test_are_an_error(tmp_path):
  data_dir = _make_category(tmp_path)
  _save(tmp_path / 'widget' / 'test' / 'stray.png', _flat(1))
  with pytest.raises(data.DatasetError, match=r'images directly in .*test would '
                     r'be left out \(stray\.png\)'):
    data.load_test_set(data_dir, 'widget', 16)


def test_zero_one_masks_read_like_zero_255_ones(tmp_path):
  data_dir = _make_category(tmp_path)
  before = data.load_test_set(data_dir, 'widget', 16)
  for defect, count in (('crack', 2), ('bent', 1)):
    for i in range(count):
      _save(os.path.join(data_dir, 'widget', 'ground_truth', defect,
                         f'{i:03d}_mask.png'), _mask(top=8 + i) // 255)
  after = data.load_test_set(data_dir, 'widget', 16)
  assert after.masks[:3].any(axis=(1, 2)).all()
  np.testing.assert_array_equal(after.masks, before.masks)


def _split_config(data_dir, tmp_path, category='widget'):
  config = mvtec_config.get_config()
  config.data_dir = data_dir
  config.category = category
  config.cache_dir = str(tmp_path / 'cache')
  return config


def _no_image_decoding(monkeypatch):
  def fail(*args):
    raise AssertionError(f'check_test_split decoded an image: {args}')

  monkeypatch.setattr(images, 'read_rgb', fail)


def test_check_test_split_passes_the_demo_set_and_a_folder(tmp_path, monkeypatch):
  demo_config = _split_config('', tmp_path, category='washer')
  demo_config.demo.update(num_train=2, num_test_good=1, num_test_per_defect=1,
                          image_size=32)
  data_dir = _make_category(tmp_path / 'data')
  _no_image_decoding(monkeypatch)
  data.check_test_split(demo_config)
  data.check_test_split(_split_config(data_dir, tmp_path))


def _without_mask(category):
  os.remove(os.path.join(category, 'ground_truth', 'crack', '001_mask.png'))
  return r'test/crack/001\.png has no mask: expected .*001_mask\.png$'


def _mask_of_other_size(category):
  _save(os.path.join(category, 'ground_truth', 'bent', '000_mask.png'), _mask(24))
  return r'mask .*bent/000_mask\.png has size .* \(24, 24\) but its image .*\(32, 32\)'


def _blank_mask(category):
  _save(os.path.join(category, 'ground_truth', 'crack', '000_mask.png'),
        np.zeros((32, 32), dtype=np.uint8))
  return r'mask .*crack/000_mask\.png is empty'


def _only_good(category):
  shutil.rmtree(os.path.join(category, 'test', 'crack'))
  shutil.rmtree(os.path.join(category, 'test', 'bent'))
  return r'test split .*widget/test has only defect-free images'


def _no_good(category):
  shutil.rmtree(os.path.join(category, 'test', 'good'))
  return r'test split .*widget/test has no defect-free images'


def _nested_defect_images(category):
  _save(os.path.join(category, 'test', 'crack', 'sub', '001.png'), _flat(1))
  return r'images in subfolder .*test/crack/sub would be left out'


@pytest.mark.parametrize('damage', [
    _without_mask, _mask_of_other_size, _blank_mask, _only_good, _no_good,
    _nested_defect_images])
def test_check_test_split_raises_what_the_reader_would(tmp_path, monkeypatch, damage):
  """Found before training, from listings and headers, with the reader's message."""
  data_dir = _make_category(tmp_path / 'data')
  pattern = damage(os.path.join(data_dir, 'widget'))
  with pytest.raises(data.DatasetError, match=pattern) as read_error:
    data.load_test_set(data_dir, 'widget', 16)
  _no_image_decoding(monkeypatch)
  with pytest.raises(data.DatasetError) as check_error:
    data.check_test_split(_split_config(data_dir, tmp_path))
  assert str(check_error.value) == str(read_error.value)


@pytest.mark.skipif(not os.path.isdir(os.path.join(_REAL_DATA_DIR, 'bottle')),
                    reason='MVTec AD bottle not available')
def test_real_mvtec_bottle(tmp_path):
  data.check_test_split(_split_config(_REAL_DATA_DIR, tmp_path, 'bottle'))
  train = data.load_train_images(_REAL_DATA_DIR, 'bottle', 64)
  test = data.load_test_set(_REAL_DATA_DIR, 'bottle', 64)
  assert train.shape == (209, 64, 64, 3)
  assert test.images.shape == (83, 64, 64, 3)
  assert int(test.labels.sum()) == 63
  defective = test.labels == 1
  assert test.masks[defective].any(axis=(1, 2)).all()
  assert not test.masks[~defective].any()
  assert set(test.defect_types) == {
      'broken_large', 'broken_small', 'contamination', 'good'}


# --- cache.py -----------------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
  monkeypatch.delenv(cache.CACHE_ENV_VAR, raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  assert data.default_cache_dir('') == os.path.join(
      str(tmp_path), '.cache', 'twostage_jax')
  monkeypatch.setenv(cache.CACHE_ENV_VAR, str(tmp_path / 'env'))
  assert data.default_cache_dir('') == str(tmp_path / 'env')
  assert data.default_cache_dir(str(tmp_path / 'x')) == str(tmp_path / 'x')


# --- demo.py ------------------------------------------------------------------


def _demo_config(seed=0, image_size=64):
  return ml_collections.ConfigDict(dict(
      seed=seed, image_size=image_size, num_train=3, num_test_good=2,
      num_test_per_defect=2))


def _read_all(data_dir, size):
  arrays = []
  for category in data.DEMO_CATEGORIES:
    test = data.load_test_set(data_dir, category, size)
    arrays += [data.load_train_images(data_dir, category, size), test.images,
               test.masks]
  return arrays


def test_demo_readable_at_configured_size(tmp_path):
  config = _demo_config()
  data_dir = data.ensure_demo_dataset(str(tmp_path), config)
  assert data.list_categories(data_dir) == sorted(data.DEMO_CATEGORIES)
  for category in data.DEMO_CATEGORIES:
    train = data.load_train_images(data_dir, category, 64)
    assert train.shape == (3, 64, 64, 3)
    for size in (64, 32):
      test = data.load_test_set(data_dir, category, size)
      num_defects = len(demo.DEMO_DEFECTS[category])
      assert len(test.paths) == 2 + 2 * num_defects
      assert set(test.defect_types) == {'good', *demo.DEMO_DEFECTS[category]}
      defective = test.labels == 1
      assert test.masks[defective].any(axis=(1, 2)).all()
      assert not test.masks[~defective].any()


def test_demo_deterministic(tmp_path):
  first = _read_all(data.ensure_demo_dataset(str(tmp_path / 'a'),
                                             _demo_config()), 64)
  second = _read_all(data.ensure_demo_dataset(str(tmp_path / 'b'),
                                              _demo_config()), 64)
  other = _read_all(data.ensure_demo_dataset(str(tmp_path / 'c'),
                                             _demo_config(seed=1)), 64)
  for a, b, c in zip(first, second, other):
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_demo_written_once(tmp_path, monkeypatch):
  config = _demo_config()
  data_dir = data.ensure_demo_dataset(str(tmp_path), config)
  marker = os.path.join(data_dir, 'weave', 'train', 'good', '000.png')
  mtime = os.stat(marker).st_mtime_ns

  def fail(*args):
    raise AssertionError(f'regenerated {args}')

  monkeypatch.setattr(demo, '_write_category', fail)
  assert data.ensure_demo_dataset(str(tmp_path), config) == data_dir
  assert os.stat(marker).st_mtime_ns == mtime
  assert os.listdir(tmp_path) == [os.path.basename(data_dir)]


def test_demo_interrupted_write_leaves_nothing(tmp_path, monkeypatch):

  def crash(*unused_args):
    raise KeyboardInterrupt

  monkeypatch.setattr(demo, '_write_category', crash)
  with pytest.raises(KeyboardInterrupt):
    data.ensure_demo_dataset(str(tmp_path), _demo_config())
  assert not os.listdir(tmp_path)


def test_demo_folder_name_encodes_settings():
  names = {demo.demo_folder_name(_demo_config()),
           demo.demo_folder_name(_demo_config(seed=1)),
           demo.demo_folder_name(_demo_config(image_size=96))}
  assert len(names) == 3
  assert all(f'v{demo.GENERATOR_VERSION}' in name for name in names)


@pytest.mark.parametrize('category', demo.DEMO_CATEGORIES)
def test_demo_mask_is_exactly_the_changed_pixels(category):
  size = 128
  for defect in demo.DEMO_DEFECTS[category]:
    for seed in range(6):
      rng = np.random.default_rng(seed)
      normal, defective, mask = demo.render_defective(
          category, defect, rng, size)
      assert normal.shape == defective.shape == (size, size, 3)
      assert normal.dtype == defective.dtype == np.uint8
      assert mask.dtype == bool
      np.testing.assert_array_equal((defective != normal).any(-1), mask)
      rows, cols = np.nonzero(mask)
      extent = max(np.ptp(rows), np.ptp(cols)) + 1
      assert extent >= 0.06 * size, (defect, seed, extent)
