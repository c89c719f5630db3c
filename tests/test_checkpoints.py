"""A damaged checkpoint is named and skipped, never a raw traceback."""

import glob
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from twostage_jax.workdir import checkpoints as checkpoints_lib

TRAIN = ml_collections.ConfigDict({'keep_checkpoints': 3})
CONFIG = ml_collections.ConfigDict({'category': 'bottle', 'sizes': (1, 2), 'train': TRAIN})


def state_of(step):
  return {'params': {'w': jnp.full((3, 4), float(step)), 'b': jnp.arange(4.0) + step},
          'step': jnp.int32(step)}


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def write(directory, steps, provenance=None):
  checkpoints = checkpoints_lib.Checkpoints(str(directory), TRAIN)
  for step in steps:
    checkpoints.save(step, state_of(step), CONFIG, provenance)
  checkpoints.close()


def reader(directory):
  return checkpoints_lib.Checkpoints(str(directory), read_only=True)


def truncate_array_files(step_dir):
  # Orbax's OCDBT store keeps the array bytes in files under `d/` folders.
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
           if os.path.isfile(f)]
  assert files
  for path in files:
    os.truncate(path, os.path.getsize(path) // 3)


def empty_state_metadata(step_dir):
  path = os.path.join(step_dir, 'state', '_METADATA')
  assert os.path.getsize(path) > 0
  open(path, 'w').close()


DAMAGES = [truncate_array_files, empty_state_metadata]


def assert_state_of(restored, step):
  np.testing.assert_array_equal(restored['params']['w'], np.full((3, 4), float(step)))
  np.testing.assert_array_equal(restored['params']['b'], np.arange(4.0) + step)
  assert int(restored['step']) == step


def test_restore_latest_restores_the_newest_checkpoint(tmp_path):
  write(tmp_path, [1, 2])
  checkpoints = reader(tmp_path)
  restored, step = checkpoints.restore_latest(abstract(state_of(0)))
  assert step == 2
  assert_state_of(restored, 2)
  checkpoints.close()


@pytest.mark.parametrize('damage', DAMAGES)
def test_restore_latest_falls_back_past_a_damaged_newest_checkpoint(tmp_path, caplog, damage):
  write(tmp_path, [1, 2])
  damage(str(tmp_path / '2'))
  checkpoints = reader(tmp_path)
  with caplog.at_level(logging.WARNING):
    restored, step = checkpoints.restore_latest(abstract(state_of(0)))
  assert step == 1
  assert_state_of(restored, 1)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any(os.path.join(str(tmp_path), '2') in w and 'Error' in w for w in warnings), warnings
  checkpoints.close()


@pytest.mark.parametrize('damage', DAMAGES)
def test_restoring_a_damaged_step_names_its_folder(tmp_path, damage):
  write(tmp_path, [1, 2])
  damage(str(tmp_path / '2'))
  checkpoints = reader(tmp_path)
  with pytest.raises(checkpoints_lib.DamagedCheckpointError,
                     match=os.path.join(str(tmp_path), '2')):
    checkpoints.restore(2, abstract(state_of(0)))
  assert_state_of(checkpoints.restore(1, abstract(state_of(0))), 1)
  checkpoints.close()


def test_every_checkpoint_damaged_raises_naming_each_folder(tmp_path):
  write(tmp_path, [1, 2])
  truncate_array_files(str(tmp_path / '2'))
  empty_state_metadata(str(tmp_path / '1'))
  checkpoints = reader(tmp_path)
  with pytest.raises(checkpoints_lib.DamagedCheckpointError) as raised:
    checkpoints.restore_latest(abstract(state_of(0)))
  message = str(raised.value)
  assert str(tmp_path) in message
  assert os.path.join(str(tmp_path), '1') in message
  assert os.path.join(str(tmp_path), '2') in message
  checkpoints.close()


def test_no_checkpoint_restores_to_none_and_a_missing_step_is_not_found(tmp_path):
  checkpoints = checkpoints_lib.Checkpoints(str(tmp_path), TRAIN)
  assert checkpoints.latest_step() is None
  assert checkpoints.restore_latest(abstract(state_of(0))) is None
  with pytest.raises(FileNotFoundError, match='step 5'):
    checkpoints.restore(5, abstract(state_of(0)))
  checkpoints.close()


def test_a_malformed_step_metadata_file_does_not_stop_the_listing(tmp_path):
  write(tmp_path, [1, 2])
  # Valid JSON of the wrong shape: Orbax's full listing would raise on it.
  (tmp_path / '2' / '_CHECKPOINT_METADATA').write_text('[]')
  checkpoints = reader(tmp_path)
  assert checkpoints.latest_step() == 2
  assert checkpoints.all_steps() == [1, 2]
  checkpoints.close()


def test_config_and_provenance_are_stored_with_the_state(tmp_path):
  provenance = {'stage1_step': 1000, 'stage1_dir': '/runs/x/checkpoints/stage1'}
  write(tmp_path, [1], provenance)
  write(tmp_path, [2])
  checkpoints = reader(tmp_path)
  assert checkpoints.provenance(1) == provenance
  assert checkpoints.provenance(2) is None
  assert checkpoints.config(1) == {'category': 'bottle', 'sizes': [1, 2],
                                   'train': {'keep_checkpoints': 3}}
  checkpoints.close()


def test_a_checkpoint_written_before_provenance_existed_still_restores(tmp_path):
  # The layout written before the 'provenance' item was added.
  manager = ocp.CheckpointManager(str(tmp_path), item_names=('state', 'config'))
  manager.save(7, args=ocp.args.Composite(state=ocp.args.StandardSave(state_of(7)),
                                          config=ocp.args.JsonSave(CONFIG.to_dict())))
  manager.wait_until_finished()
  manager.close()
  checkpoints = reader(tmp_path)
  restored, step = checkpoints.restore_latest(abstract(state_of(0)))
  assert step == 7
  assert_state_of(restored, 7)
  assert checkpoints.provenance(7) is None
  assert checkpoints.config(7)['category'] == 'bottle'
  checkpoints.close()


def test_saving_again_at_a_damaged_step_replaces_it(tmp_path):
  # A run that fell back to step 1 reaches step 2 again and saves it.
  write(tmp_path, [1, 2])
  truncate_array_files(str(tmp_path / '2'))
  checkpoints = checkpoints_lib.Checkpoints(str(tmp_path), TRAIN)
  replacement = jax.tree.map(lambda x: x + 10, state_of(2))
  checkpoints.save(2, replacement, CONFIG)
  checkpoints.close()
  checkpoints = reader(tmp_path)
  restored, step = checkpoints.restore_latest(abstract(state_of(0)))
  assert step == 2
  np.testing.assert_array_equal(restored['params']['b'], np.arange(4.0) + 12)
  checkpoints.close()


def test_keeps_only_the_newest_keep_checkpoints(tmp_path):
  write(tmp_path, [1, 2, 3])
  write(tmp_path, [4, 5])  # a resumed run deletes the oldest too
  checkpoints = reader(tmp_path)
  assert checkpoints.all_steps() == [3, 4, 5]
  assert sorted(os.listdir(tmp_path)) == ['3', '4', '5']
  checkpoints.close()
