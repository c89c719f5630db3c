"""Run outputs are replaced whole or not at all."""

import json
import os

import numpy as np
import pytest

from twostage_jax.workdir import atomic_write


def test_json_round_trips_and_creates_the_folder(tmp_path):
  path = tmp_path / 'new' / 'thresholds.json'
  atomic_write.write_json(str(path), {'image': 0.25, 'steps': [1000, 2000]})
  assert json.loads(path.read_text()) == {'image': 0.25, 'steps': [1000, 2000]}
  assert os.listdir(path.parent) == ['thresholds.json']


def test_a_value_json_cannot_hold_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'metrics.json'
  atomic_write.write_json(str(path), {'pixel_auroc': 0.9})
  with pytest.raises(TypeError):
    atomic_write.write_json(str(path), {'pixel_auroc': np.float32(0.8)})
  assert json.loads(path.read_text()) == {'pixel_auroc': 0.9}
  assert os.listdir(tmp_path) == ['metrics.json']


def test_a_failure_before_the_rename_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / 'report.md'
  atomic_write.write_text(str(path), 'old report')

  def interrupted(src, dst):
    raise KeyboardInterrupt  # e.g. Ctrl-C between the write and the rename

  monkeypatch.setattr(os, 'replace', interrupted)
  with pytest.raises(KeyboardInterrupt):
    atomic_write.write_text(str(path), 'new report')
  assert path.read_text() == 'old report'
  assert os.listdir(tmp_path) == ['report.md']


def test_permissions_are_those_of_a_plainly_created_file(tmp_path):
  plain = tmp_path / 'plain.txt'
  plain.write_text('x')
  written = tmp_path / 'written.txt'
  atomic_write.write_text(str(written), 'x')
  assert os.stat(written).st_mode == os.stat(plain).st_mode
