"""Tests of prediction's host side: reading a folder of images, writing outputs."""

import csv
import json
import logging
import os

import numpy as np
from PIL import Image
import pytest

from twostage_jax import data
from twostage_jax.inference import calibration
from twostage_jax.inference import predict
from twostage_jax.workdir import paths

_SIZE = 32


def _write_image(path, array, mode=None):
  image = Image.fromarray(array)
  if mode is not None:
    image = image.convert(mode)
  image.save(path)


def _make_folder(root):
  """A folder of images in every awkward mode, plus files to skip.

  Names are chosen so that file order differs from the order of creation
  and one extension is upper case.
  """
  folder = root / 'inputs'
  folder.mkdir()
  rng = np.random.default_rng(0)
  _write_image(folder / 'e_deep.png',
               np.full((30, 20), 65535, dtype=np.uint16))  # Saved as I;16.
  _write_image(folder / 'a_rgb.png',
               rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
  _write_image(folder / 'b_gray.png',
               rng.integers(0, 256, (50, 70), dtype=np.uint8), 'L')
  _write_image(folder / 'c_photo.JPG', np.full((24, 36, 3), 90, np.uint8))
  _write_image(folder / 'd_alpha.png', np.full((32, 32, 3), 200, np.uint8),
               'RGBA')
  (folder / 'notes.txt').write_text('not an image')
  (folder / '.DS_Store').write_bytes(b'\x00\x01')
  _write_image(folder / '.hidden.png', np.zeros((8, 8, 3), np.uint8))
  (folder / 'sub').mkdir()
  _write_image(folder / 'sub' / 'inner.png', np.zeros((8, 8, 3), np.uint8))
  return folder


def test_load_image_folder_reads_every_image_mode_sorted(tmp_path, caplog):
  folder = _make_folder(tmp_path)
  with caplog.at_level(logging.WARNING):
    loaded = data.load_image_folder(str(folder), _SIZE)

  names = [os.path.basename(p) for p in loaded.paths]
  assert names == ['a_rgb.png', 'b_gray.png', 'c_photo.JPG', 'd_alpha.png',
                   'e_deep.png']
  assert loaded.paths[0] == os.path.join(str(folder), 'a_rgb.png')
  assert loaded.images.shape == (5, _SIZE, _SIZE, 3)
  assert loaded.images.dtype == np.uint8
  np.testing.assert_array_equal(
      loaded.original_sizes, [[40, 60], [50, 70], [24, 36], [32, 32], [30, 20]])
  gray = loaded.images[1]
  assert np.array_equal(gray[..., 0], gray[..., 1])
  assert np.array_equal(gray[..., 0], gray[..., 2])
  assert (loaded.images[3] == 200).all()  # RGBA: alpha dropped.
  assert (loaded.images[4] == 255).all()  # 16-bit full scale -> 255.

  assert loaded.unreadable == {}

  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert warnings == [
      'skipping 1 file that is not an image: notes.txt',
      f'skipping 1 subfolder of {folder} (subfolders are not searched): sub']
  assert '.DS_Store' not in caplog.text and 'inner.png' not in caplog.text


def test_load_image_folder_lists_several_skipped_files_once(tmp_path, caplog):
  folder = tmp_path / 'inputs'
  folder.mkdir()
  _write_image(folder / 'x.png', np.zeros((8, 8, 3), np.uint8))
  (folder / 'a.txt').write_text('')
  (folder / 'b.csv').write_text('')
  with caplog.at_level(logging.WARNING):
    data.load_image_folder(str(folder), _SIZE)
  assert caplog.messages == [
      'skipping 2 files that are not images: a.txt, b.csv']


def test_load_image_folder_cuts_long_listings_short(tmp_path, caplog):
  folder = tmp_path / 'inputs'
  folder.mkdir()
  _write_image(folder / 'x.png', np.zeros((8, 8, 3), np.uint8))
  for i in range(12):
    (folder / f'{i:02d}.txt').write_text('')
  with caplog.at_level(logging.WARNING):
    data.load_image_folder(str(folder), _SIZE)
  listed = ', '.join(f'{i:02d}.txt' for i in range(10))
  assert caplog.messages == [
      f'skipping 12 files that are not images: {listed}, ... (2 more)']


@pytest.mark.parametrize('kind', ['missing', 'file'])
def test_load_image_folder_rejects_a_path_that_is_not_a_folder(tmp_path,
                                                                kind):
  path = tmp_path / 'inputs'
  if kind == 'file':
    path.write_text('')
  with pytest.raises(data.DatasetError, match='does not exist or is not a'):
    data.load_image_folder(str(path), _SIZE)
  with pytest.raises(data.DatasetError) as error:
    data.load_image_folder(str(path), _SIZE)
  assert str(path) in str(error.value)


def test_load_image_folder_without_images_says_what_it_found(tmp_path):
  folder = tmp_path / 'inputs'
  folder.mkdir()
  (folder / 'notes.txt').write_text('not an image')
  (folder / '.DS_Store').write_text('')
  (folder / 'test').mkdir()
  with pytest.raises(data.DatasetError) as error:
    data.load_image_folder(str(folder), _SIZE)
  message = str(error.value)
  assert message.startswith('no images (.png, .jpg')
  assert str(folder) in message
  assert '1 other file: notes.txt' in message
  assert '1 subfolder (not searched): test' in message
  assert '.DS_Store' not in message


def test_load_image_folder_of_an_empty_folder(tmp_path):
  folder = tmp_path / 'empty'
  folder.mkdir()
  with pytest.raises(data.DatasetError) as error:
    data.load_image_folder(str(folder), _SIZE)
  assert str(error.value).endswith(f'in {folder}; found nothing else')


def test_load_image_folder_names_skipped_subfolders(tmp_path, caplog):
  folder = tmp_path / 'inputs'
  folder.mkdir()
  _write_image(folder / 'x.png', np.zeros((8, 8, 3), np.uint8))
  for name in ('good', 'bad', '.cache'):
    (folder / name).mkdir()
    _write_image(folder / name / 'inner.png', np.zeros((8, 8, 3), np.uint8))
  with caplog.at_level(logging.WARNING):
    loaded = data.load_image_folder(str(folder), _SIZE)
  assert [os.path.basename(p) for p in loaded.paths] == ['x.png']
  assert caplog.messages == [
      f'skipping 2 subfolders of {folder} (subfolders are not searched): '
      'bad, good']


def _write_corrupt_images(folder):
  """A file that is no image at all, and a PNG cut off inside its pixels."""
  (folder / 'b_garbage.png').write_text('not an image')
  _write_image(folder / 'whole.png',
               np.random.default_rng(0).integers(0, 256, (40, 40, 3),
                                                 dtype=np.uint8))
  whole = (folder / 'whole.png').read_bytes()
  (folder / 'd_cut.png').write_bytes(whole[:len(whole) // 2])
  (folder / 'whole.png').unlink()


def test_load_image_folder_skips_corrupt_images_and_names_them(tmp_path,
                                                               caplog):
  folder = tmp_path / 'inputs'
  folder.mkdir()
  _write_image(folder / 'a_good.png', np.zeros((8, 6, 3), np.uint8))
  _write_image(folder / 'c_good.png', np.full((10, 12, 3), 7, np.uint8))
  _write_corrupt_images(folder)
  with caplog.at_level(logging.WARNING):
    loaded = data.load_image_folder(str(folder), _SIZE)

  assert [os.path.basename(p) for p in loaded.paths] == ['a_good.png',
                                                         'c_good.png']
  assert loaded.images.shape == (2, _SIZE, _SIZE, 3)
  assert (loaded.images[1] == 7).all()
  np.testing.assert_array_equal(loaded.original_sizes, [[8, 6], [10, 12]])
  garbage, cut = str(folder / 'b_garbage.png'), str(folder / 'd_cut.png')
  assert list(loaded.unreadable) == [garbage, cut]
  assert loaded.unreadable[garbage].startswith(
      f'cannot read image file {garbage}: cannot identify image file')
  assert loaded.unreadable[cut].startswith(f'cannot read image file {cut}: ')
  assert 'truncated' in loaded.unreadable[cut]
  assert caplog.messages == [
      f'skipping an unreadable image: {loaded.unreadable[garbage]}',
      f'skipping an unreadable image: {loaded.unreadable[cut]}']


def test_load_image_folder_without_a_readable_image_is_an_error(tmp_path):
  folder = tmp_path / 'inputs'
  folder.mkdir()
  _write_corrupt_images(folder)
  (folder / 'notes.txt').write_text('')
  with pytest.raises(data.DatasetError) as error:
    data.load_image_folder(str(folder), _SIZE)
  assert str(error.value) == (
      f'no readable image in {folder}; 2 image files could not be decoded: '
      'b_garbage.png, d_cut.png')


def _square_maps(count, low=0.0, high=1.0):
  """Maps of `low` with a `high` 8x8 square at rows and columns 12..19."""
  maps = np.full((count, _SIZE, _SIZE), low, dtype=np.float32)
  maps[:, 12:20, 12:20] = high
  return maps


def _read(path):
  with Image.open(path) as image:
    image.load()
    return image


def test_write_predictions_writes_outputs_at_original_sizes(tmp_path):
  loaded = data.load_image_folder(str(_make_folder(tmp_path)), _SIZE)
  count = len(loaded.paths)
  out = tmp_path / 'out' / 'nested'
  written = predict.write_predictions(
      str(out), loaded.paths, loaded.original_sizes, loaded.images,
      _square_maps(count), np.linspace(0.0, 1.0, count), image_threshold=0.5,
      pixel_threshold=0.5)

  stems = ['a_rgb', 'b_gray', 'c_photo', 'd_alpha', 'e_deep']
  expected = [str(out / f'{s}_{kind}.png') for s in stems
              for kind in ('heatmap', 'mask')] + [str(out / 'scores.csv')]
  assert written == expected
  assert sorted(os.listdir(out)) == sorted(os.path.basename(p)
                                           for p in expected)
  for stem, (height, width) in zip(stems, loaded.original_sizes):
    heatmap = _read(out / f'{stem}_heatmap.png')
    mask = _read(out / f'{stem}_mask.png')
    assert heatmap.mode == 'RGB' and mask.mode == 'L'
    assert heatmap.size == mask.size == (width, height)
  assert _read(out / 'b_gray_heatmap.png').size == (70, 50)


def test_mask_and_heatmap_follow_the_map_at_original_size(tmp_path):
  images = np.full((1, _SIZE, _SIZE, 3), 100, dtype=np.uint8)
  predict.write_predictions(
      str(tmp_path), ['in/b.png'], np.array([[50, 70]]), images,
      _square_maps(1), np.array([0.9]), image_threshold=0.5,
      pixel_threshold=0.5)

  mask = np.asarray(_read(tmp_path / 'b_mask.png'))
  assert mask.shape == (50, 70)
  assert set(np.unique(mask)) == {0, 255}
  # The square covers 12..20 of 32: rows 18.75..31.25, columns 26.25..43.75.
  rows, cols = np.nonzero(mask)
  assert 17 <= rows.min() <= 21 and 29 <= rows.max() <= 33
  assert 24 <= cols.min() <= 29 and 41 <= cols.max() <= 46
  assert mask[25, 35] == 255
  assert mask[0, 0] == mask[49, 69] == mask[25, 5] == 0

  # jet: 1.0 (twice the threshold) is dark red, 0.0 dark blue.
  heatmap = np.asarray(_read(tmp_path / 'b_heatmap.png')).astype(int)
  red, _, blue = heatmap[25, 35]
  assert red > 100 and blue < 60
  red, _, blue = heatmap[0, 0]
  assert blue > 100 and red < 60


def test_the_pixel_threshold_sits_mid_colormap(tmp_path):
  images = np.zeros((1, _SIZE, _SIZE, 3), dtype=np.uint8)
  maps = np.full((1, _SIZE, _SIZE), 0.25, dtype=np.float32)
  predict.write_predictions(
      str(tmp_path), ['x.png'], np.array([[_SIZE, _SIZE]]), images, maps,
      np.array([0.0]), image_threshold=1.0, pixel_threshold=0.25)
  assert (np.asarray(_read(tmp_path / 'x_mask.png')) == 255).all()
  red, green, blue = np.asarray(_read(tmp_path / 'x_heatmap.png'))[5, 5]
  assert green > red and green > blue  # jet is green in the middle.


def test_scores_csv_rows_and_decisions(tmp_path):
  scores = np.array([0.1234567891, 0.5, 0.49999, 7.0], dtype=np.float64)
  paths = ['d/one.png', 'd/two.png', 'd/three.jpg', 'd/four.bmp']
  predict.write_predictions(
      str(tmp_path), paths, np.full((4, 2), _SIZE),
      np.zeros((4, _SIZE, _SIZE, 3), np.uint8), _square_maps(4), scores,
      image_threshold=0.5, pixel_threshold=0.5)
  with open(tmp_path / 'scores.csv', newline='') as f:
    rows = list(csv.reader(f))
  assert rows == [
      ['file', 'image_score', 'decision'],
      ['one.png', '0.123457', 'normal'],
      ['two.png', '0.5', 'anomalous'],  # Equal to the threshold.
      ['three.jpg', '0.49999', 'normal'],
      ['four.bmp', '7', 'anomalous'],
  ]


def test_unreadable_files_get_a_row_without_a_score(tmp_path):
  written = predict.write_predictions(
      str(tmp_path), ['d/one.png', 'd/two.png'], np.full((2, 2), _SIZE),
      np.zeros((2, _SIZE, _SIZE, 3), np.uint8), _square_maps(2),
      np.array([0.2, 0.8]), image_threshold=0.5, pixel_threshold=0.5,
      unreadable=['d/bad.png', 'd/a_bad.jpg'])
  with open(tmp_path / 'scores.csv', newline='') as f:
    rows = list(csv.reader(f))
  assert rows == [
      ['file', 'image_score', 'decision'],
      ['one.png', '0.2', 'normal'],
      ['two.png', '0.8', 'anomalous'],
      ['bad.png', '', 'unreadable'],
      ['a_bad.jpg', '', 'unreadable'],
  ]
  assert [os.path.basename(p) for p in written] == [
      'one_heatmap.png', 'one_mask.png', 'two_heatmap.png', 'two_mask.png',
      'scores.csv']
  assert sorted(os.listdir(tmp_path)) == sorted(
      os.path.basename(p) for p in written)


def test_scores_csv_is_replaced_atomically(tmp_path, monkeypatch):
  (tmp_path / 'scores.csv').write_text('previous run\n')
  replaced = []
  real_replace = os.replace

  def spy_replace(source, target):
    replaced.append((source, target, open(source).read()))
    real_replace(source, target)

  monkeypatch.setattr(os, 'replace', spy_replace)
  predict.write_predictions(**_valid_arguments(tmp_path, output_dir=tmp_path))
  [(source, target, text)] = replaced
  assert target == str(tmp_path / 'scores.csv')
  assert source != target and os.path.dirname(source) == str(tmp_path)
  assert text == 'file,image_score,decision\n0.png,0,normal\n1.png,0,normal\n'
  assert (tmp_path / 'scores.csv').read_text() == text
  assert not [n for n in os.listdir(tmp_path) if n.endswith('.tmp')]


def test_float32_score_equal_to_the_threshold_is_anomalous(tmp_path):
  threshold = np.float32(0.3)
  predict.write_predictions(
      str(tmp_path), ['a.png'], np.array([[_SIZE, _SIZE]]),
      np.zeros((1, _SIZE, _SIZE, 3), np.uint8), _square_maps(1),
      np.array([threshold]), image_threshold=float(threshold),
      pixel_threshold=0.5)
  with open(tmp_path / 'scores.csv', newline='') as f:
    assert list(csv.reader(f))[1] == ['a.png', '0.3', 'anomalous']


def test_shared_stems_keep_the_extension_and_overwrite_nothing(tmp_path):
  maps = np.stack([np.zeros((_SIZE, _SIZE)), np.ones((_SIZE, _SIZE)),
                   np.zeros((_SIZE, _SIZE))]).astype(np.float32)
  written = predict.write_predictions(
      str(tmp_path), ['in/a.png', 'in/a.jpg', 'in/b.png'],
      np.full((3, 2), _SIZE), np.zeros((3, _SIZE, _SIZE, 3), np.uint8), maps,
      np.zeros(3), image_threshold=0.5, pixel_threshold=0.5)
  assert [os.path.basename(p) for p in written] == [
      'a_png_heatmap.png', 'a_png_mask.png', 'a_jpg_heatmap.png',
      'a_jpg_mask.png', 'b_heatmap.png', 'b_mask.png', 'scores.csv']
  assert (np.asarray(_read(tmp_path / 'a_png_mask.png')) == 0).all()
  assert (np.asarray(_read(tmp_path / 'a_jpg_mask.png')) == 255).all()


def test_names_that_still_clash_are_refused_before_writing(tmp_path):
  out = tmp_path / 'out'
  with pytest.raises(ValueError, match="overwrite each other's outputs: a_png"):
    predict.write_predictions(
        str(out), ['a.png', 'a.jpg', 'a_png.bmp'], np.full((3, 2), _SIZE),
        np.zeros((3, _SIZE, _SIZE, 3), np.uint8), _square_maps(3),
        np.zeros(3), image_threshold=0.5, pixel_threshold=0.5)
  assert not out.exists()


def _valid_arguments(tmp_path, count=2, output_dir=None):
  return {
      'output_dir': str(output_dir or tmp_path / 'out'),
      'paths': [f'{i}.png' for i in range(count)],
      'original_sizes': np.full((count, 2), _SIZE),
      'images': np.zeros((count, _SIZE, _SIZE, 3), np.uint8),
      'maps': _square_maps(count),
      'scores': np.zeros(count),
      'image_threshold': 0.5,
      'pixel_threshold': 0.5,
  }


@pytest.mark.parametrize('threshold', [0.0, -1.0, float('nan')])
def test_pixel_threshold_must_be_positive(tmp_path, threshold):
  arguments = _valid_arguments(tmp_path)
  arguments['pixel_threshold'] = threshold
  with pytest.raises(ValueError, match='pixel_threshold must be > 0'):
    predict.write_predictions(**arguments)
  assert not (tmp_path / 'out').exists()


def test_inputs_of_different_lengths_are_named(tmp_path):
  arguments = _valid_arguments(tmp_path)
  arguments['scores'] = np.zeros(3)
  with pytest.raises(ValueError) as error:
    predict.write_predictions(**arguments)
  assert str(error.value) == (
      'one entry per image expected; lengths differ: paths 2, '
      'original_sizes 2, images 2, maps 2, scores 3')
  assert not (tmp_path / 'out').exists()


_COMPUTED = {'image': 0.25, 'pixel': 0.5, 'num_holdout_images': 3}


def _fake_compute(monkeypatch):
  """Replaces the held-out inference by a fixed result; returns its calls."""
  calls = []

  def compute(config, model, held_out=None):
    calls.append((config, model))
    return dict(_COMPUTED)

  monkeypatch.setattr(calibration, 'compute_thresholds', compute)
  return calls


@pytest.mark.parametrize('content', [
    b'', b'{"image": 0.3, "pix', b'[0.3, 0.5]', b'null', b'\xff\xfe{'])
def test_an_unusable_thresholds_file_is_recomputed(tmp_path, monkeypatch,
                                                   caplog, content):
  calls = _fake_compute(monkeypatch)
  path = paths.thresholds_file(str(tmp_path))
  os.makedirs(os.path.dirname(path))
  with open(path, 'wb') as f:
    f.write(content)
  config, model = object(), object()
  with caplog.at_level(logging.WARNING):
    thresholds = calibration.ensure_thresholds(config, str(tmp_path), model)
  assert thresholds == _COMPUTED
  assert calls == [(config, model)]
  with open(path) as f:
    assert json.load(f) == _COMPUTED
  [warning] = [r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING]
  assert warning.startswith(f'ignoring unusable thresholds file {path} (')
  assert warning.endswith('); recomputing')


def test_current_stored_thresholds_are_reused(tmp_path, monkeypatch):
  calls = _fake_compute(monkeypatch)
  monkeypatch.setattr(calibration, '_is_current', lambda *_: True)
  stored = {'image': 0.75, 'pixel': 0.125}
  path = paths.thresholds_file(str(tmp_path))
  os.makedirs(os.path.dirname(path))
  with open(path, 'w') as f:
    json.dump(stored, f)
  assert calibration.ensure_thresholds(object(), str(tmp_path),
                                       object()) == stored
  assert not calls
