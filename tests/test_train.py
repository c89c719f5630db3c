"""End to end through main.py: resume after a kill, multi-process training, evaluation."""

import json
import os
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

import child_process  # tests/child_process.py
import float32_tolerance  # tests/float32_tolerance.py
import tiny_runs  # tests/tiny_runs.py
from configs import demo
from twostage_jax import methods
from twostage_jax.evaluation import evaluate
from twostage_jax.inference import engine
from twostage_jax.runtime import parallel
from twostage_jax.runtime import prefetch
from twostage_jax.training import precision
from twostage_jax.training import progress
from twostage_jax.training import train
from twostage_jax.training import train_state
from twostage_jax.training import train_step
from twostage_jax.workdir import paths

ROOT = child_process.ROOT


def overrides(**extra):
  """A tiny run on the demo data; the same values go to main.py and in-process runs."""
  return {**tiny_runs.TINY_DEMO, 'model.width': 4, 'train.log_every': 2, **extra}


def make_config(values):
  config = demo.get_config()
  config.update_from_flattened_dict(values)
  return config


def main_command(workdir, values):
  return child_process.main_command('demo.py', workdir, values)


def final_params(config, workdir, stage):
  state, step = train_state.restore_state(methods.get(config.method), config, str(workdir),
                                          stage, parallel.make_mesh())
  return jax.tree.leaves(jax.device_get(train_state.variables_of(state))), step


# 12 steps: after the step-3 checkpoint a run has 9 steps and 3 checkpoints
# to go, far more than the 20 ms in which the test kills it. No held-out maps
# in TensorBoard: they change nothing that is compared here
# (tests/test_summaries.py tests them) and cost a forward pass per checkpoint.
NUM_STEPS = 12
RESUME_VALUES = {'train.num_steps': NUM_STEPS, 'train.checkpoint_every': 3,
                 'train.keep_checkpoints': 50, 'train.tensorboard_images': 0}


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """(config, workdir) of both stages trained by main.py on one device without interruption.

  The runs of the resume test use one device too: 8 simulated devices share
  2 cores and would run their 24 steps several times slower.
  """
  workdir = tmp_path_factory.mktemp('uninterrupted')
  values = overrides(**RESUME_VALUES)
  result = subprocess.run(main_command(workdir, values), env=child_process.environment(1),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return make_config(values), workdir


def start_main(workdir, values, log):
  """main.py training in the background, its stderr written to the file `log`."""
  with open(log, 'w', encoding='utf-8') as stderr:
    return subprocess.Popen(main_command(workdir, values), env=child_process.environment(1),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)


def kill_after_checkpoint(process, checkpoint):
  """kill -9 `process` as soon as the folder `checkpoint` exists (or it ended, or 300 s)."""
  deadline = time.time() + 300
  while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()


@pytest.mark.slow
def test_a_run_killed_in_each_stage_resumes_to_the_same_parameters(
    tmp_path, uninterrupted):
  """kill -9 after stage 1's step-3 checkpoint; the resumed run, kill -9 after stage 2's;
  the run resumed again ends with the uninterrupted run's parameters, bit for bit.

  Bit for bit because every step computes the same compiled program (same
  config, XLA flags and one device, as the uninterrupted run) on the same
  inputs: a restored state is the bytes saved, and every sample is seeded
  by (seed, epoch, index).
  """
  config, reference = uninterrupted
  values = overrides(**RESUME_VALUES)
  killed = tmp_path / 'killed'
  for stage in (1, 2):
    log = tmp_path / f'killed_in_stage{stage}.log'
    process = start_main(killed, values, log)
    checkpoint = killed / 'checkpoints' / f'stage{stage}' / '3'
    kill_after_checkpoint(process, checkpoint)
    assert checkpoint.exists(), f'the run never wrote its stage-{stage} step-3 checkpoint'
    assert not (killed / 'checkpoints' / f'stage{stage}' / str(NUM_STEPS)).exists(), \
        'finished early'
    assert not (killed / 'eval').exists()
    if stage == 2:  # this run resumed stage 1
      assert 'stage 1 resumed from the checkpoint at step' in log.read_text()

  result = subprocess.run(main_command(killed, values), env=child_process.environment(1),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'stage 2 resumed from the checkpoint at step' in result.stderr
  for stage in (1, 2):
    resumed, step = final_params(config, killed, stage)
    expected, expected_step = final_params(config, reference, stage)
    assert step == expected_step == NUM_STEPS
    for a, b in zip(resumed, expected):
      np.testing.assert_array_equal(a, b)
  metrics = [json.loads(line) for line in (killed / 'metrics.jsonl').read_text().splitlines()]
  assert (metrics[-1]['stage'], metrics[-1]['step']) == (2, NUM_STEPS)
  logged = [(r['stage'], r['step']) for r in metrics]
  assert logged == sorted(set(logged)), 'after two kills, metrics.jsonl holds each step once'
  written = json.loads((killed / 'eval' / 'metrics.json').read_text())
  assert written['stage1_step'] == written['stage2_step'] == NUM_STEPS
  assert list(written['rows']) == ['stage 1', 'stage 2', 'combined']


def logged_losses(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return {r['step']: r['loss'] for r in map(json.loads, lines) if r['stage'] == 1}


@pytest.mark.slow
def test_main_trains_checkpoints_and_evaluates_in_two_processes(tmp_path):
  """The CLI across 2 processes of one device each (the step's equivalence
  with one process, to float64 precision, is tests/test_parallel.py's).

  Step 1's loss is taken before any update, so it shows that the processes
  fed the same global batch as one process of 8 devices: a forward pass,
  which two layouts compute alike to float32_tolerance's 1e-4 of its scale
  (tests/float32_tolerance.py derives it). What it guards: the loss of
  another batch, here the reference's step 2, which must differ by more
  than 3x that.
  """
  values = overrides(**{'train.num_steps': 2, 'train.log_every': 1,
                        'train.tensorboard_images': 0})
  reference = tmp_path / 'single'
  train.train(methods.get('two_stage'), make_config(values), str(reference), 1)
  expected = logged_losses(reference)
  assert abs(expected[2] - expected[1]) > 3 * float32_tolerance.RELATIVE_TO_SCALE * expected[1]

  workdir = tmp_path / 'multi'
  coordinator = f'localhost:{child_process.free_port()}'
  commands = [main_command(workdir, dict(values, **{
      'distributed.enabled': True,
      'distributed.coordinator_address': coordinator,
      'distributed.num_processes': 2,
      'distributed.process_id': process_id})) for process_id in range(2)]
  first, second = child_process.run_together(commands, [child_process.environment(1)] * 2,
                                             tmp_path)
  for finished in (first, second):
    assert finished.returncode == 0, finished.stderr[-3000:]
  assert '2 processes, 2 devices' in first.stderr
  assert (workdir / 'checkpoints' / 'stage1' / '2').is_dir()
  assert (workdir / 'checkpoints' / 'stage2' / '2').is_dir()
  float32_tolerance.assert_same_function(logged_losses(workdir)[1], expected[1])
  written = json.loads((workdir / 'eval' / 'metrics.json').read_text())
  assert written['stage1_step'] == written['stage2_step'] == 2
  assert written['num_images'] == 4 + 3 * 2
  assert 'pixel AUROC' in first.stdout


def test_train_then_evaluate_from_the_checkpoint(tmp_path):
  values = overrides(**{'train.num_steps': 4, 'train.checkpoint_every': 2,
                                   'train.keep_checkpoints': 1})
  config = make_config(values)
  state = train.train(methods.get(config.method), config, str(tmp_path), 1)
  assert int(state.step) == 4
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in lines] == [1, 2, 4]
  assert 'images_per_s' not in lines[0]  # the first step includes compilation
  assert {'loss', 'l2', 'ssim', 'learning_rate', 'images_per_s'} <= set(lines[1])
  assert all(0 <= r['data_wait_fraction'] <= 1 for r in lines[1:])
  assert os.listdir(tmp_path / 'checkpoints' / 'stage1') == ['4']  # keeps 1

  model = engine.TrainedModel(
      methods.get('two_stage'), (jax.device_get(train_state.variables_of(state)),), (4,), 'stage 1')
  after_training = evaluate.evaluate(config, str(tmp_path), model)
  from_checkpoint = evaluate.evaluate(config, str(tmp_path))
  assert from_checkpoint == after_training
  assert list(from_checkpoint['rows']) == ['stage 1']
  assert from_checkpoint['num_images'] == 4 + 3 * 2
  written = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
  assert written == from_checkpoint

  # Running the finished command again resumes at the end and trains no more.
  again = train.train(methods.get(config.method), config, str(tmp_path), 1)
  np.testing.assert_array_equal(jax.tree.leaves(jax.device_get(again.params))[0],
                                jax.tree.leaves(jax.device_get(state.params))[0])


def test_evaluate_without_checkpoint_names_the_folder(tmp_path):
  config = make_config(overrides())
  with pytest.raises(FileNotFoundError, match=f'no stage-1 checkpoint in {tmp_path}'):
    evaluate.evaluate(config, str(tmp_path))
  config.eval.stage1_step = 7
  # 4 steps, as test_train_then_evaluate_from_the_checkpoint trains: the same compiled step.
  train.train(methods.get('two_stage'),
              make_config(overrides(**{'train.num_steps': 4, 'train.checkpoint_every': 4})),
              str(tmp_path), 1)
  with pytest.raises(FileNotFoundError, match=r'no checkpoint for step 7 .*available steps: \[4\]'):
    evaluate.evaluate(config, str(tmp_path))


def test_unknown_demo_category_is_a_clear_error(tmp_path):
  config = make_config(overrides(category='bottle'))
  with pytest.raises(ValueError, match="category 'bottle' is not in the built-in demo"):
    train.train(methods.get(config.method), config, str(tmp_path), 1)


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
  if method == 'bauer':  # one SDC block of two dilations: the smallest program
    config.update_from_flattened_dict({
        'model.encoder_widths': (4, 8), 'model.sdc_blocks': 1, 'model.sdc_filters': 4,
        'model.sdc_dilations': (1, 2), 'model.sdc_kernel': 3})
  else:
    config.model.width = 4
  rng = np.random.default_rng(0)
  images = rng.random((8, 16, 16, 3), dtype=np.float32)
  masks = (rng.random((8, 16, 16)) < 0.2).astype(np.float32)
  batch = {'image': images, 'mask': masks, 'target': images * (1 - masks[..., None])}
  mesh = parallel.make_mesh()
  state = jax.device_put(train_state.create_train_state(methods.get(config.method), config,
                                                        train_state.prng_key(0)),
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


def test_progress_logs_the_learning_rate_of_the_schedule_it_is_given(tmp_path):
  config = demo.get_config()
  log = progress.Progress(str(tmp_path), config, 1, 0, lambda step: 0.5 * (step + 1))
  for step in (1, 3):
    log.log(step, {'loss': np.float32(1.0)}, prefetch.DataWaitClock(), first=step == 1)
  records = [json.loads(line) for line in open(paths.metrics_log(str(tmp_path)))]
  # The rate of step n is the schedule at n - 1: optax counts updates from 0.
  assert [r['learning_rate'] for r in records] == [0.5, 1.5]
