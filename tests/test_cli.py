"""main.py as a user meets it: mistakes end in one line naming the problem, before any work."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image

from configs import demo
from twostage_jax.workdir import lock as workdir_lock
from twostage_jax.workdir import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(workdir, *flags):
  command = [sys.executable, os.path.join(ROOT, 'main.py'),
             f'--config={os.path.join(ROOT, "configs", "demo.py")}', f'--workdir={workdir}',
             *flags]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  return result.stderr


def test_a_misspelt_config_key_is_one_line_with_a_suggestion(tmp_path):
  stderr = run_main(tmp_path / 'run', '--config.trian.num_steps=5')
  assert 'error: bad --config override' in stderr and 'Did you mean "train"' in stderr
  assert not os.path.exists(tmp_path / 'run')


def test_invalid_values_are_listed_before_any_work(tmp_path):
  stderr = run_main(tmp_path / 'run', '--config.train.num_steps=-5', '--config.method=draem')
  assert ("error: unknown method 'draem'; known methods: 'anoseg', 'bauer', 'two_stage', "
          "'utad'") in stderr
  stderr = run_main(tmp_path / 'run', '--config.train.num_steps=-5')
  assert 'config.train.num_steps = -5 must be positive' in stderr
  assert not os.path.exists(tmp_path / 'run')


def test_an_override_that_changes_what_was_learned_is_refused(tmp_path):
  workdir = tmp_path / 'run'
  run_config.save(demo.get_config(), str(workdir))
  stderr = run_main(workdir, '--config.model.width=16', '--config.category=washer',
                    '--config.train.log_every=1')
  refused = stderr.split('would change it:')[1].split('Drop them')[0]
  assert 'model.width' in refused and 'category' in refused and 'log_every' not in refused
  assert sorted(os.listdir(workdir)) == ['config.json']


def test_a_second_run_on_a_workdir_is_refused_naming_the_first(tmp_path):
  workdir = str(tmp_path / 'run')
  with workdir_lock.WorkdirLock(workdir, run_id='first'):
    stderr = run_main(workdir, '--config.train.num_steps=1')
  assert f'pid {os.getpid()}' in stderr and 'first' in stderr and 'in use by another run' in stderr
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def test_a_broken_test_split_stops_training_before_it_starts(tmp_path):
  rng = np.random.default_rng(0)
  category = tmp_path / 'data' / 'widget'
  for folder, count in (('train/good', 6), ('test/good', 2), ('test/crack', 2)):
    os.makedirs(category / folder)
    for i in range(count):
      Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
          category / folder / f'{i:03d}.png')
  os.makedirs(category / 'ground_truth' / 'crack')
  Image.fromarray(np.full((32, 32), 255, np.uint8)).save(
      category / 'ground_truth' / 'crack' / '000_mask.png')  # 001 has none
  workdir = tmp_path / 'run'
  stderr = run_main(workdir, f'--config.data_dir={tmp_path / "data"}',
                    '--config.category=widget', '--config.image_size=32',
                    f'--config.cache_dir={tmp_path / "cache"}')
  assert 'error: defective test image' in stderr and '001.png has no mask' in stderr
  assert not os.path.exists(workdir / 'checkpoints')


def test_a_config_of_another_method_names_the_config_to_start_from(tmp_path):
  stderr = run_main(tmp_path / 'run', '--config.method=bauer')
  assert ("error: config.method = 'bauer', but the config lacks its key 'encoder_widths': it "
          'was written for another method; start from --config=configs/bauer.py') in stderr
  stderr = run_main(tmp_path / 'run', '--config.method=utad')
  assert "lacks its key 'ie_net'" in stderr and 'start from --config=configs/utad.py' in stderr
  assert not os.path.exists(tmp_path / 'run')


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('mine')
  stderr = run_main(path)
  assert f'error: --workdir={path} is a file; give a folder' in stderr
  assert path.read_text() == 'mine'


def test_a_batch_the_devices_cannot_share_is_one_line_and_pins_nothing(tmp_path):
  stderr = run_main(tmp_path / 'run', '--config.train.global_batch_size=4')  # 8 devices
  assert ('error: global batch size 4 does not divide by the 8 devices of this run; choose a '
          'multiple of 8.') in stderr
  assert not os.path.exists(tmp_path / 'run' / 'config.json')
