"""Tests of predict()'s folder checks and wiring, with inference faked out."""

import csv
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from twostage_jax import data
from twostage_jax.inference import detector
from twostage_jax.inference import predict

_SIZE = 16


def _make_inputs(folder, corrupt=True):
  """A black and a white image, and (if `corrupt`) a file no decoder reads."""
  folder.mkdir(parents=True)
  Image.fromarray(np.zeros((20, 10, 3), np.uint8)).save(folder / 'a.png')
  Image.fromarray(np.full((12, 12, 3), 255, np.uint8)).save(folder / 'c.png')
  if corrupt:
    (folder / 'b.png').write_text('not an image')
  return folder


def _config(predict_dir, output_dir=''):
  config = ml_collections.ConfigDict()
  config.predict_dir = str(predict_dir)
  config.predict_output_dir = str(output_dir)
  config.image_size = _SIZE
  return config


def _fake_detect(images):
  maps = images.mean(axis=-1) / 255.0
  return maps, maps.max(axis=(1, 2))


def _fake_inference(monkeypatch):
  """A detector without a model: the map is the image's mean channel value."""
  info = {'input_size': _SIZE, 'batch_size': 4, 'thresholds': {'image': 0.5, 'pixel': 0.5}}
  monkeypatch.setattr(detector.Detector, 'from_run',
                      classmethod(lambda cls, config, workdir: cls(_fake_detect, info)))


def _refuse_inference(monkeypatch):
  """Makes loading the model fail the test: checks must come before it."""
  def from_run(cls, config, workdir):
    raise AssertionError('the model was loaded before the folder check')

  monkeypatch.setattr(detector.Detector, 'from_run', classmethod(from_run))


def test_predict_scores_readable_images_and_lists_the_unreadable(
    tmp_path, monkeypatch):
  _fake_inference(monkeypatch)
  inputs = _make_inputs(tmp_path / 'in')
  out = predict.predict(_config(inputs, tmp_path / 'out'), str(tmp_path))
  assert out == str(tmp_path / 'out')
  with open(tmp_path / 'out' / 'scores.csv', newline='') as f:
    assert list(csv.reader(f)) == [
        ['file', 'image_score', 'decision'],
        ['a.png', '0', 'normal'],
        ['c.png', '1', 'anomalous'],
        ['b.png', '', 'unreadable'],
    ]
  assert sorted(os.listdir(tmp_path / 'out')) == [
      'a_heatmap.png', 'a_mask.png', 'c_heatmap.png', 'c_mask.png',
      'scores.csv']


@pytest.mark.parametrize('output', ['.', './', 'link', 'link/', '../in/./'])
def test_the_image_folder_itself_is_refused(tmp_path, output):
  inputs = _make_inputs(tmp_path / 'in')
  (tmp_path / 'link').symlink_to(inputs)
  output_dir = os.path.join(str(inputs if output.startswith('.') else tmp_path),
                            output)
  with pytest.raises(data.DatasetError) as error:
    predict.check_output_dir(str(inputs), output_dir)
  assert str(error.value) == (
      f'output folder {output_dir} is the image folder {inputs}: outputs '
      'would mix with the images to score; set --config.predict_output_dir '
      'to a folder outside it')


@pytest.mark.parametrize('output', ['in/out', 'in/a/b', 'link/out'])
def test_a_folder_inside_the_image_folder_is_refused(tmp_path, output):
  inputs = _make_inputs(tmp_path / 'in')
  (tmp_path / 'link').symlink_to(inputs)
  output_dir = str(tmp_path / output)
  with pytest.raises(data.DatasetError,
                     match='is inside the image folder') as error:
    predict.check_output_dir(str(inputs), output_dir)
  assert output_dir in str(error.value) and str(inputs) in str(error.value)


@pytest.mark.parametrize('output', ['out', 'in2', 'in_out', '.'])
def test_separate_folders_are_accepted(tmp_path, output):
  inputs = _make_inputs(tmp_path / 'in')
  # '.' holds the image folder, but outputs go to its top level and the
  # image folder is read flat, so they are never read back.
  predict.check_output_dir(str(inputs), str(tmp_path / output))


def test_predict_refuses_its_image_folder_before_reading_anything(
    tmp_path, monkeypatch):
  _refuse_inference(monkeypatch)
  inputs = _make_inputs(tmp_path / 'in', corrupt=False)
  before = sorted(os.listdir(inputs))
  with pytest.raises(data.DatasetError, match='is the image folder'):
    predict.predict(_config(inputs, f'{inputs}/'), str(tmp_path))
  # The default output folder, <workdir>/predictions, is checked too.
  predictions = _make_inputs(tmp_path / 'run' / 'predictions', corrupt=False)
  with pytest.raises(data.DatasetError, match='is the image folder'):
    predict.predict(_config(predictions), str(tmp_path / 'run'))
  assert sorted(os.listdir(inputs)) == before


def test_check_writable_creates_the_folder_and_leaves_nothing(tmp_path):
  out = tmp_path / 'a' / 'b'
  predict.check_writable(str(out))
  assert out.is_dir() and not os.listdir(out)


def test_an_output_folder_under_a_file_is_named(tmp_path):
  (tmp_path / 'file').write_text('')
  out = str(tmp_path / 'file' / 'out')
  with pytest.raises(data.DatasetError) as error:
    predict.check_writable(out)
  assert str(error.value) == (
      f'cannot write predictions to output folder {out}: Not a directory')


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write anywhere')
def test_a_read_only_output_folder_is_named(tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  out.chmod(0o555)
  try:
    with pytest.raises(data.DatasetError,
                       match=f'cannot write .* folder {out}: Permission'):
      predict.check_writable(str(out))
  finally:
    out.chmod(0o755)


def test_predict_checks_the_output_folder_before_loading_the_model(
    tmp_path, monkeypatch):
  _refuse_inference(monkeypatch)
  inputs = _make_inputs(tmp_path / 'in', corrupt=False)
  (tmp_path / 'file').write_text('')
  out = str(tmp_path / 'file' / 'out')
  with pytest.raises(data.DatasetError,
                     match=f'cannot write predictions to output folder {out}'):
    predict.predict(_config(inputs, out), str(tmp_path))
