"""What the Detector and --mode=predict accept, refuse and say; runs that fail or move.

The cases a new user's probe met: values read by dtype, shapes read by rank,
damaged exports, a run that fails before its first checkpoint, data moved
after training, and metrics.jsonl after a resume.
"""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from configs import demo
from twostage_jax import cli
from twostage_jax import data
from twostage_jax.inference import detector
from twostage_jax.training import progress
from twostage_jax.workdir import paths
from twostage_jax.workdir import run_config

SIZE = 8
FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'premove_two_stage')


def _seeing_detector():
  """A Detector whose map is what the model was given: the mean channel, in 0..255."""

  def detect(images):
    maps = images.astype(np.float32).mean(axis=-1)
    return maps, maps.max(axis=(1, 2))

  info = {'input_size': SIZE, 'thresholds': {'image': 1000.0, 'pixel': 1000.0}, 'batch_size': 4}
  return detector.Detector(detect, info)


def _seen(images):
  """The 0..255 values the detector's model was given, one per image."""
  return [float(m.mean()) for m in _seeing_detector().predict(images).maps]


@pytest.mark.parametrize('dtype, value, expected', [
    (np.uint8, 255, 255), (np.uint8, 128, 128), (np.float32, 1.0, 255), (np.float32, 0.5, 128),
    (np.uint16, 65535, 255), (np.uint16, 32768, 128), (np.uint16, 4095, 16),
    (np.int32, 2 ** 31 - 1, 255), (np.int32, 2 ** 30, 128), (np.int64, 0, 0)])
def test_values_are_read_by_dtype(dtype, value, expected):
  assert _seen([np.full((SIZE, SIZE, 3), value, dtype)]) == [expected]


@pytest.mark.parametrize('values, found', [
    ([0.0, 255.0], r'\[0, 255\]'), ([-0.5, 0.5], r'\[-0.5, 0.5\]'), ([0.0, np.nan], 'NaN')])
def test_float_outside_the_unit_interval_is_refused_naming_what_was_found(values, found):
  image = np.resize(np.array(values, np.float32), (SIZE, SIZE, 3))
  with pytest.raises(ValueError, match=f'float image must lie in \\[0, 1\\].*{found}'):
    _seeing_detector().predict([image])


def test_negative_integers_are_refused():
  with pytest.raises(ValueError, match='int16 pixel values must be 0 or more, found -3'):
    _seeing_detector().predict([np.full((SIZE, SIZE), -3, np.int16)])


def test_a_nested_list_image_is_refused_not_read_as_integers():
  image = np.full((SIZE, SIZE, 3), 200, np.uint8).tolist()
  with pytest.raises(ValueError, match='not a nested list'):
    _seeing_detector().predict([image])


def test_shapes_are_read_by_rank():
  one = np.zeros((SIZE + 2, SIZE + 4, 3), np.uint8)
  assert len(_seeing_detector().predict(one).scores) == 1  # not SIZE + 2 gray images
  gray = np.zeros((SIZE, SIZE), np.uint8)
  prediction = _seeing_detector().predict(gray)
  assert len(prediction.scores) == 1 and prediction.maps[0].shape == (SIZE, SIZE)
  assert len(_seeing_detector().predict(np.zeros((5, SIZE, SIZE, 1), np.uint8)).scores) == 5
  assert len(_seeing_detector().predict((gray, one)).scores) == 2
  with pytest.raises(ValueError, match=r'shape \(3, 16, 16\)'):
    _seeing_detector().predict(np.zeros((3, 16, 16), np.uint8))  # N gray images or one?
  with pytest.raises(ValueError, match=r'shape \(16,\)'):
    _seeing_detector().predict(np.zeros(16, np.uint8))


@pytest.mark.parametrize('images', [[], (), np.zeros((0, SIZE, SIZE, 3), np.uint8)])
def test_an_empty_batch_is_refused(images):
  with pytest.raises(ValueError, match='the batch is empty'):
    _seeing_detector().predict(images)


def _write(path, array):
  Image.fromarray(array).save(path)
  return str(path)


def test_predict_reads_16_and_32_bit_integer_files_by_their_range(tmp_path):
  half32 = np.full((SIZE, SIZE), 2 ** 30, np.int32)
  assert data.read_rgb(_write(tmp_path / 'a.tif', half32), SIZE).max() == 128
  white = np.full((SIZE, SIZE), 2 ** 31 - 1, np.int32)
  assert data.read_rgb(_write(tmp_path / 'b.tif', white), SIZE).min() == 255
  half16 = np.full((SIZE, SIZE), 32768, np.uint16)
  assert data.read_rgb(_write(tmp_path / 'c.png', half16), SIZE).max() == 128
  negative = _write(tmp_path / 'd.tif', np.full((SIZE, SIZE), -1, np.int32))
  with pytest.raises(data.DatasetError, match='d.tif: int32 pixel values must be 0 or more'):
    data.read_rgb(negative, SIZE)


@pytest.mark.parametrize('damaged', [detector.EXPORT_FILE, detector.INFO_FILE])
def test_a_damaged_export_names_the_file_and_what_to_do(tmp_path, damaged):
  folder = tmp_path / 'export'
  shutil.copytree(os.path.join(FIXTURE, 'export'), folder)
  content = (folder / damaged).read_bytes()
  (folder / damaged).write_bytes(content[:len(content) // 2])
  with pytest.raises(detector.DamagedExport,
                     match=f'{folder / damaged} cannot be read .* write the export again'):
    detector.Detector.load(str(folder))


def test_an_export_json_without_the_input_size_is_named(tmp_path):
  folder = tmp_path / 'export'
  shutil.copytree(os.path.join(FIXTURE, 'export'), folder)
  info = json.loads((folder / detector.INFO_FILE).read_text())
  del info['input_size']
  (folder / detector.INFO_FILE).write_text(json.dumps(info))
  with pytest.raises(detector.DamagedExport, match='it lacks input_size'):
    detector.Detector.load(str(folder))


def _category(root, corrupt_train=False):
  """A tiny MVTec-layout category 'widget' under `root`."""
  rng = np.random.default_rng(0)
  base = root / 'widget'
  for folder, count in (('train/good', 6), ('test/good', 2), ('test/crack', 2)):
    os.makedirs(base / folder)
    for i in range(count):
      _write(base / folder / f'{i:03d}.png', rng.integers(0, 256, (32, 32, 3), np.uint8))
  os.makedirs(base / 'ground_truth' / 'crack')
  for i in range(2):
    _write(base / 'ground_truth' / 'crack' / f'{i:03d}_mask.png', np.full((32, 32), 255, np.uint8))
  if corrupt_train:
    (base / 'train' / 'good' / '003.png').write_bytes(b'not a png')
  return root


def _config(data_dir, tmp_path):
  config = demo.get_config()
  config.update_from_flattened_dict({
      'data_dir': str(data_dir), 'category': 'widget', 'image_size': 32,
      'cache_dir': str(tmp_path / 'cache'), 'data_cache': 'none', 'train.num_workers': 0})
  return config


def test_a_run_that_fails_before_its_first_checkpoint_does_not_pin_its_config(tmp_path):
  config = _config(_category(tmp_path / 'data', corrupt_train=True), tmp_path)
  workdir = str(tmp_path / 'run')
  with pytest.raises(data.DatasetError, match='003.png'):
    cli.run_category(config, workdir, 'train')
  assert run_config.load(workdir) is None
  assert not os.path.exists(paths.data_contents_file(workdir))
  changed = _config(tmp_path / 'data', tmp_path)
  changed.train.global_batch_size = 4  # the corrected command is not "a change"
  assert cli._checked_run_config(changed, {'train.global_batch_size': 4},
                                 workdir).train.global_batch_size == 4


def _trained_on(data_dir, tmp_path):
  """A workdir whose config and data contents were recorded, as training does first."""
  config = _config(data_dir, tmp_path)
  workdir = str(tmp_path / 'run')
  run_config.save(config, workdir)
  cli._save_data_contents(config, workdir)
  return workdir


def test_data_moved_after_training_may_be_pointed_to(tmp_path):
  workdir = _trained_on(_category(tmp_path / 'data'), tmp_path)
  moved = tmp_path / 'elsewhere'
  shutil.move(tmp_path / 'data', moved)
  config = _config(moved, tmp_path)
  resolved = cli._checked_run_config(config, {'data_dir': str(moved)}, workdir)
  assert resolved.data_dir == str(moved)


def test_other_data_at_the_new_place_is_refused_naming_the_files(tmp_path):
  workdir = _trained_on(_category(tmp_path / 'data'), tmp_path)
  other = _category(tmp_path / 'other')
  _write(other / 'widget' / 'test' / 'good' / '001.png', np.zeros((32, 32, 3), np.uint8))
  os.remove(other / 'widget' / 'train' / 'good' / '005.png')
  with pytest.raises(run_config.ConfigMismatch) as error:
    cli._checked_run_config(_config(other, tmp_path), {'data_dir': str(other)}, workdir)
  assert '1 missing: train/good/005.png' in str(error.value)
  assert '1 changed: test/good/001.png' in str(error.value)


@pytest.mark.parametrize('record', ['{"category": "wid', '{"category": "widget"}', '[]'])
def test_a_damaged_record_of_the_training_data_is_named(tmp_path, record):
  workdir = _trained_on(_category(tmp_path / 'data'), tmp_path)
  with open(paths.data_contents_file(workdir), 'w', encoding='utf-8') as f:
    f.write(record)
  moved = tmp_path / 'elsewhere'
  shutil.move(tmp_path / 'data', moved)
  with pytest.raises(run_config.ConfigMismatch) as error:
    cli._checked_run_config(_config(moved, tmp_path), {'data_dir': str(moved)}, workdir)
  message = str(error.value)
  assert paths.data_contents_file(workdir) in message and 'is damaged' in message
  assert f'point --config.data_dir at {tmp_path / "data"}' in message


def test_a_resumed_stage_drops_the_records_it_will_log_again(tmp_path):
  log = tmp_path / 'metrics.jsonl'
  records = [{'stage': 1, 'step': s} for s in (1, 2, 4, 6)] + [{'stage': 2, 'step': 2}]
  log.write_text(''.join(json.dumps(r) + '\n' for r in records) + '{"stage": 2, "st')
  progress.Progress(str(tmp_path), demo.get_config(), 1, 4, lambda step: 0.1)
  kept = [json.loads(line) for line in log.read_text().splitlines()]
  assert kept == [{'stage': 1, 'step': s} for s in (1, 2, 4)] + [{'stage': 2, 'step': 2}]
