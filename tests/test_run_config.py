"""A workdir runs with the config it was trained with; overrides are checked."""

import fnmatch
import json
import logging
import os
import pathlib

import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from twostage_jax import methods
from twostage_jax.workdir import checkpoints as checkpoints_lib
from twostage_jax.workdir import paths
from twostage_jax.workdir import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command_line(config_file, *overrides):
  """(FLAGS.config, explicit overrides) as main.py would parse them."""
  argv = ['main.py', f'--config={os.path.join(ROOT, "configs", config_file)}', *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config file', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config, run_config.explicit_overrides(flag_values['config'])


def trained(workdir, config_file='mvtec.py', *overrides):
  """A workdir whose first training ran with this command line."""
  config, _ = command_line(config_file, *overrides)
  run_config.save(config, str(workdir))
  return config


def saved_json(workdir):
  return json.loads(pathlib.Path(paths.config_file(str(workdir))).read_text())


def test_explicit_overrides_are_the_config_flags_given():
  config, overrides = command_line('mvtec.py', '--config.category=grid',
                                   '--config.train.num_steps=5',
                                   '--config.synthesis.saim_n_segments=(10, 20)')
  assert overrides == {'category': 'grid', 'train.num_steps': 5,
                       'synthesis.saim_n_segments': (10, 20)}
  assert config.category == 'grid'


def test_a_new_workdir_runs_the_file_config_and_saves_it_at_training(tmp_path):
  config, overrides = command_line('mvtec.py', '--config.category=grid')
  resolved = run_config.resolve(config, overrides, str(tmp_path))
  assert resolved.category == 'grid'
  assert not pathlib.Path(paths.config_file(str(tmp_path))).exists()  # only training writes it
  run_config.save(resolved, str(tmp_path))
  saved = saved_json(tmp_path)
  assert saved['category'] == 'grid'
  assert saved['synthesis']['saim_n_segments'] == [30, 150, 250]
  assert saved['stage2']['num_steps'] is None  # a placeholder
  assert os.listdir(tmp_path) == [os.path.basename(paths.config_file(str(tmp_path)))]


def test_overrides_that_would_change_what_was_learned_are_refused_naming_each(tmp_path):
  trained(tmp_path, 'mvtec.py', '--config.category=bottle')
  config, overrides = command_line('mvtec.py', '--config.category=grid',
                                   '--config.model.width=64', '--config.eval.batch_size=4',
                                   '--config.image_size=256')
  with pytest.raises(run_config.ConfigMismatch) as raised:
    run_config.resolve(config, overrides, str(tmp_path))
  message = str(raised.value)
  assert '--config.category: saved "bottle", given "grid"' in message
  assert '--config.model.width: saved 128, given 64' in message
  assert paths.config_file(str(tmp_path)) in message
  assert 'eval.batch_size:' not in message  # allowed to change
  assert 'image_size:' not in message  # equal to the saved value


def test_allowed_overrides_apply_to_this_command_only(tmp_path):
  trained(tmp_path)
  before = saved_json(tmp_path)
  config, overrides = command_line(
      'mvtec.py', '--config.eval.batch_size=4', '--config.predict_dir=/new/images',
      '--config.distributed.enabled=True', '--config.eval.map_sigma=2.5',
      '--config.xla_cpu_options={"xla_cpu_use_thunk_runtime": False}')
  resolved = run_config.resolve(config, overrides, str(tmp_path))
  assert resolved.eval.batch_size == 4
  assert resolved.predict_dir == '/new/images'
  assert resolved.distributed.enabled is True
  assert resolved.eval.map_sigma == 2.5
  assert resolved.xla_cpu_options.to_dict() == {'xla_cpu_use_thunk_runtime': False}
  run_config.save(resolved, str(tmp_path))  # a resumed training
  assert saved_json(tmp_path) == before


def test_config_file_values_never_replace_the_saved_ones(tmp_path):
  trained(tmp_path, 'mvtec.py', '--config.category=carpet')
  # Another recipe of the same method, no overrides: its values are defaults.
  config, overrides = command_line('mvtec_cpu.py')
  resolved = run_config.resolve(config, overrides, str(tmp_path))
  assert resolved.category == 'carpet'
  assert resolved.image_size == 256 and config.image_size == 64
  assert resolved.model.width == 128
  assert resolved.train.num_workers == 4
  assert resolved.xla_cpu_options.to_dict() == {}
  assert resolved.synthesis.saim_n_segments == (30, 150, 250)  # a tuple again
  assert resolved.stage2.num_steps is None
  assert resolved.is_locked
  # An allowed key the saved config lacks (its XLA options were empty).
  config, overrides = command_line(
      'mvtec_cpu.py', '--config.xla_cpu_options.xla_cpu_experimental_ynn_fusion_type=NONE')
  resolved = run_config.resolve(config, overrides, str(tmp_path))
  assert resolved.xla_cpu_options.to_dict() == {'xla_cpu_experimental_ynn_fusion_type': 'NONE'}


def test_a_config_file_of_another_method_warns_and_the_saved_config_is_used(tmp_path, caplog):
  trained(tmp_path, 'bauer.py')
  config, overrides = command_line('mvtec.py')
  with caplog.at_level(logging.WARNING):
    resolved = run_config.resolve(config, overrides, str(tmp_path))
  assert resolved.method == 'bauer'
  assert resolved.model.encoder_widths == (32, 64, 128)
  assert 'refine' not in resolved  # nothing of the other method is added
  assert any("'bauer'" in r.getMessage() and 'saved config is used' in r.getMessage()
             for r in caplog.records if r.levelno == logging.WARNING)
  _, overrides = command_line('mvtec.py', '--config.refine.n_segments=100')
  with pytest.raises(run_config.ConfigMismatch,
                     match='refine.n_segments: not in the saved config'):
    run_config.resolve(config, overrides, str(tmp_path))


def test_keys_an_older_saved_config_lacks_take_the_file_values(tmp_path):
  trained(tmp_path, 'mvtec.py', '--config.category=grid')
  old = saved_json(tmp_path)
  del old['xla_cpu_options']
  del old['eval']['map_sigma']
  pathlib.Path(paths.config_file(str(tmp_path))).write_text(json.dumps(old))
  config, overrides = command_line('mvtec_cpu.py')
  resolved = run_config.resolve(config, overrides, str(tmp_path))
  assert resolved.eval.map_sigma == 4.0
  assert resolved.xla_cpu_options.to_dict() == config.xla_cpu_options.to_dict()
  assert resolved.category == 'grid' and resolved.image_size == 256


def write_checkpoint(workdir, stage, step, config, modified):
  directory = paths.stage_checkpoints(workdir, stage)
  checkpoints = checkpoints_lib.Checkpoints(directory, config.train)
  checkpoints.save(step, {'w': jnp.zeros(2)}, config)
  checkpoints.close()
  os.utime(os.path.join(directory, str(step)), (modified, modified))


def test_a_workdir_from_before_config_json_uses_its_newest_checkpoint_config(tmp_path):
  stage1, _ = command_line('mvtec.py', '--config.category=carpet', '--config.image_size=128')
  stage2, _ = command_line('mvtec.py', '--config.category=carpet', '--config.image_size=128',
                           '--config.eval.batch_size=8')
  write_checkpoint(str(tmp_path), 1, 1000, stage1, modified=1_000_000)
  write_checkpoint(str(tmp_path), 2, 500, stage2, modified=2_000_000)
  config, overrides = command_line('mvtec.py', '--config.eval.num_examples=2')
  resolved = run_config.resolve(config, overrides, str(tmp_path))
  assert (resolved.category, resolved.image_size) == ('carpet', 128)
  assert resolved.eval.batch_size == 8  # stage 2's checkpoint is the newest
  assert resolved.eval.num_examples == 2
  _, overrides = command_line('mvtec.py', '--config.category=grid')
  with pytest.raises(run_config.ConfigMismatch, match='stage2/500'):
    run_config.resolve(config, overrides, str(tmp_path))
  run_config.save(resolved, str(tmp_path))  # the first training after the change
  saved = saved_json(tmp_path)
  assert (saved['category'], saved['image_size']) == ('carpet', 128)
  assert saved['eval']['num_examples'] == 6  # the checkpoint's, not this command's


def test_a_workdir_without_config_or_checkpoints_is_new(tmp_path):
  (tmp_path / 'eval').mkdir()
  config, overrides = command_line('mvtec.py', '--config.category=grid')
  assert run_config.resolve(config, overrides, str(tmp_path)) is config


def test_per_run_keys_are_keys_of_the_configs_and_cover_their_subkeys():
  configs = [command_line(name)[0] for name in ('mvtec.py', 'anoseg.py', 'utad.py')]
  method_keys = tuple(key for name in methods.names() for key in methods.get(name).per_run_keys)
  names = {key for config in configs for key in _dotted_keys(config.to_dict())}
  for key in run_config.PER_RUN_KEYS + method_keys:
    assert fnmatch.filter(names, key), f'{key} is a key of no config'
  assert run_config.is_per_run('distributed.coordinator_address')
  assert not run_config.is_per_run('refine.superpixels')
  assert run_config.is_per_run('refine.superpixels', methods.get('two_stage').per_run_keys)
  assert run_config.is_per_run('xla_cpu_options.xla_cpu_use_thunk_runtime')
  assert not run_config.is_per_run('train.num_steps')
  assert not run_config.is_per_run('eval')
  assert not run_config.is_per_run('predict_dir_extra')
  assert run_config.is_per_run('eval.stage3_step')  # every stage's, however many
  assert not run_config.is_per_run('eval.stage3_steps')


def _dotted_keys(tree: dict, prefix: str = '') -> set[str]:
  """Every key of a nested dict, sections included, as 'section.key'."""
  keys = set()
  for name, value in tree.items():
    keys.add(prefix + name)
    if isinstance(value, dict):
      keys |= _dotted_keys(value, f'{prefix}{name}.')
  return keys


def test_stage_two_may_follow_a_workdir_whose_stage_one_was_trained_alone(tmp_path):
  trained(tmp_path, 'mvtec.py', '--config.category=carpet', '--config.stage=1')
  config, overrides = command_line('mvtec.py', '--config.category=carpet', '--config.stage=2')
  resolved = run_config.resolve(config, overrides, str(tmp_path))
  assert resolved.stage == '2'
  run_config.save(resolved, str(tmp_path))
  assert saved_json(tmp_path)['stage'] == '1'  # a per-run value is never saved
  _, overrides = command_line('mvtec.py', '--config.category=carpet', '--config.stage=2',
                              '--config.train.learning_rate=0.5')
  with pytest.raises(run_config.ConfigMismatch, match='learning_rate'):
    run_config.resolve(config, overrides, str(tmp_path))
