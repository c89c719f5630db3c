"""End to end through main.py: resume after a kill, multi-process training, evaluation."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import demo
from twostage_jax import evaluate
from twostage_jax import inference
from twostage_jax import methods
from twostage_jax import parallel
from twostage_jax import precision
from twostage_jax import train
from twostage_jax import train_state
from twostage_jax import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def overrides(cache_dir, **extra):
  """A tiny run on the demo data; the same values go to main.py and in-process runs."""
  values = {
      'cache_dir': str(cache_dir),
      'image_size': 32,
      'model.width': 4,
      'demo.num_train': 16,
      'demo.num_test_good': 4,
      'demo.num_test_per_defect': 2,
      'train.num_workers': 0,
      'train.log_every': 2,
      'eval.batch_size': 8,
  }
  values.update(extra)
  return values


def make_config(values):
  config = demo.get_config()
  config.update_from_flattened_dict(values)
  return config


def main_command(workdir, values, mode='train'):
  flags = [f'--config.{k}={v}' for k, v in values.items()]
  return [sys.executable, os.path.join(ROOT, 'main.py'),
          f'--config={os.path.join(ROOT, "configs", "demo.py")}',
          f'--workdir={workdir}', f'--mode={mode}'] + flags


def environment(num_devices):
  env = dict(os.environ)
  env.update(XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}',
             JAX_PLATFORMS='cpu')
  return env


def final_params(config, workdir, stage):
  state, step = train_state.restore_state(config, str(workdir), stage, parallel.make_mesh())
  return jax.tree.leaves(jax.device_get(train_state.variables_of(state))), step


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('cache')


RESUME_VALUES = {'train.num_steps': 30, 'train.checkpoint_every': 3,
                 'train.keep_checkpoints': 50}


@pytest.fixture(scope='module')
def uninterrupted(cache_dir, tmp_path_factory):
  """Both stages trained in this process without interruption."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  config = make_config(overrides(cache_dir, **RESUME_VALUES))
  for stage in (1, 2):
    train.train(config, str(workdir), stage)
  return config, workdir


@pytest.mark.slow
@pytest.mark.parametrize('killed_stage', [1, 2])
def test_run_killed_after_a_checkpoint_resumes_to_the_same_parameters(
    cache_dir, tmp_path, uninterrupted, killed_stage):
  config, reference = uninterrupted
  values = overrides(cache_dir, **RESUME_VALUES)
  killed = tmp_path / 'killed'
  process = subprocess.Popen(main_command(killed, values), env=environment(8), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  checkpoint = killed / 'checkpoints' / f'stage{killed_stage}' / '3'
  deadline = time.time() + 300
  while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert checkpoint.exists(), f'the run never wrote its stage-{killed_stage} step-3 checkpoint'
  assert not (killed / 'checkpoints' / f'stage{killed_stage}' / '30').exists(), 'finished early'
  assert not (killed / 'eval').exists()

  result = subprocess.run(main_command(killed, values), env=environment(8), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'stage {killed_stage} resumed from the checkpoint at step' in result.stderr
  for stage in (1, 2):
    resumed, step = final_params(config, killed, stage)
    expected, expected_step = final_params(config, reference, stage)
    assert step == expected_step == 30
    for a, b in zip(resumed, expected):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  metrics = [json.loads(line) for line in (killed / 'metrics.jsonl').read_text().splitlines()]
  assert (metrics[-1]['stage'], metrics[-1]['step']) == (2, 30)
  written = json.loads((killed / 'eval' / 'metrics.json').read_text())
  assert written['stage1_step'] == written['stage2_step'] == 30
  assert list(written['rows']) == ['stage 1', 'stage 2', 'combined']


def free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def logged_losses(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return {r['step']: r['loss'] for r in map(json.loads, lines) if r['stage'] == 1}


@pytest.mark.slow
def test_main_trains_checkpoints_and_evaluates_in_two_processes(cache_dir, tmp_path):
  """The CLI across 2 processes x 4 devices (the step's equivalence with one
  process is tests/test_parallel.py's). Step 1's loss is taken before any
  update, so it shows that the processes fed the same global batch."""
  values = overrides(cache_dir, **{'train.num_steps': 2, 'train.log_every': 1})
  reference = tmp_path / 'single'
  train.train(make_config(values), str(reference), 1)

  workdir = tmp_path / 'multi'
  port = free_port()
  processes = []
  for process_id in range(2):
    distributed = dict(values, **{
        'distributed.enabled': True,
        'distributed.coordinator_address': f'localhost:{port}',
        'distributed.num_processes': 2,
        'distributed.process_id': process_id})
    processes.append(subprocess.Popen(
        main_command(workdir, distributed), env=environment(4), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  assert '2 processes, 8 devices' in outputs[0][1]
  assert (workdir / 'checkpoints' / 'stage1' / '2').is_dir()
  assert (workdir / 'checkpoints' / 'stage2' / '2').is_dir()
  assert logged_losses(workdir)[1] == pytest.approx(logged_losses(reference)[1], rel=1e-5)
  written = json.loads((workdir / 'eval' / 'metrics.json').read_text())
  assert written['stage1_step'] == written['stage2_step'] == 2
  assert written['num_images'] == 4 + 3 * 2
  assert 'pixel AUROC' in outputs[0][0]


def test_train_then_evaluate_from_the_checkpoint(cache_dir, tmp_path):
  values = overrides(cache_dir, **{'train.num_steps': 4, 'train.checkpoint_every': 2,
                                   'train.keep_checkpoints': 1})
  config = make_config(values)
  state = train.train(config, str(tmp_path), 1)
  assert int(state.step) == 4
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in lines] == [1, 2, 4]
  assert 'images_per_s' not in lines[0]  # the first step includes compilation
  assert {'loss', 'l2', 'ssim', 'learning_rate', 'images_per_s'} <= set(lines[1])
  assert all(0 <= r['data_wait_fraction'] <= 1 for r in lines[1:])
  assert os.listdir(tmp_path / 'checkpoints' / 'stage1') == ['4']  # keeps 1

  model = inference.TrainedModel(
      'two_stage', (jax.device_get(train_state.variables_of(state)),), (4,), 'stage 1')
  after_training = evaluate.evaluate(config, str(tmp_path), model)
  from_checkpoint = evaluate.evaluate(config, str(tmp_path))
  assert from_checkpoint == after_training
  assert list(from_checkpoint['rows']) == ['stage 1']
  assert from_checkpoint['num_images'] == 4 + 3 * 2
  written = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
  assert written == from_checkpoint

  # Running the finished command again resumes at the end and trains no more.
  again = train.train(config, str(tmp_path), 1)
  np.testing.assert_array_equal(jax.tree.leaves(jax.device_get(again.params))[0],
                                jax.tree.leaves(jax.device_get(state.params))[0])


def test_evaluate_without_checkpoint_names_the_folder(cache_dir, tmp_path):
  config = make_config(overrides(cache_dir))
  with pytest.raises(FileNotFoundError, match=f'no stage-1 checkpoint in {tmp_path}'):
    evaluate.evaluate(config, str(tmp_path))
  config.eval.stage1_step = 7
  train.train(make_config(overrides(cache_dir, **{'train.num_steps': 2})), str(tmp_path), 1)
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 7 .*available steps: \[2\]'):
    evaluate.evaluate(config, str(tmp_path))


def test_unknown_demo_category_is_a_clear_error(cache_dir, tmp_path):
  config = make_config(overrides(cache_dir, category='bottle'))
  with pytest.raises(ValueError, match="category 'bottle' is not in the built-in demo"):
    train.train(config, str(tmp_path), 1)


def test_compute_dtype_auto_is_float32_on_cpu_and_can_be_set():
  config = demo.get_config()
  assert config.model.compute_dtype == 'auto'
  assert jax.default_backend() == 'cpu' and precision.compute_dtype(config) == jax.numpy.float32
  config.model.compute_dtype = 'bfloat16'
  assert methods.get(config.method).create_model(config, 1).dtype == jax.numpy.bfloat16
  config.model.compute_dtype = 'float64'
  with pytest.raises(ValueError, match="'float64' needs 64-bit JAX: set JAX_ENABLE_X64=1"):
    precision.compute_dtype(config)
  with jax.enable_x64(True):
    assert precision.compute_dtype(config) == jax.numpy.float64


@pytest.mark.parametrize('method', ['two_stage', 'bauer'])
def test_bfloat16_training_keeps_float32_state_and_learns(method):
  from configs import bauer  # pylint: disable=import-outside-toplevel
  config = bauer.get_config() if method == 'bauer' else demo.get_config()
  config.update_from_flattened_dict({'image_size': 16, 'model.compute_dtype': 'bfloat16'})
  if method == 'bauer':
    config.model.encoder_widths = (4, 8, 8)
    config.model.sdc_filters = 4
  else:
    config.model.width = 4
  rng = np.random.default_rng(0)
  images = rng.random((8, 16, 16, 3), dtype=np.float32)
  masks = (rng.random((8, 16, 16)) < 0.2).astype(np.float32)
  batch = {'image': images, 'mask': masks, 'target': images * (1 - masks[..., None])}
  mesh = parallel.make_mesh()
  state = jax.device_put(train_state.create_train_state(config, train_state.prng_key(0)),
                         parallel.replicated(mesh))
  objective = methods.get(config.method).objective(config, 1)
  step = parallel.data_parallel(
      lambda s, b, k: train_step.train_step(s, b, k, objective), mesh)
  batch = jax.device_put(batch, parallel.batch_sharded(mesh))
  losses = []
  for i in range(12):
    state, metrics = step(state, batch, train_state.prng_key(i))
    losses.append(float(metrics['loss']))
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]
  dtypes = {leaf.dtype for leaf in jax.tree.leaves((state.params, state.opt_state,
                                                    state.batch_stats))
            if jax.numpy.issubdtype(leaf.dtype, jax.numpy.floating)}
  assert dtypes == {jax.numpy.dtype('float32')}
