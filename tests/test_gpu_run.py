"""The prepared GPU run (benchmarks/gpu_run.sh) in its --tiny form on the CPU."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
    'paper_run', os.path.join(ROOT, 'benchmarks', 'paper_run.py'))
paper_run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(paper_run)
FILES = ('smoke', 'step_bf16', 'step_f32', 'paper_run', 'inference')
BUDGET_S = 240


def _numbers(tree, path=''):
  """(path, value) of every number in a JSON tree."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _numbers(value, f'{path}.{key}')
  elif isinstance(tree, list):
    for i, value in enumerate(tree):
      yield from _numbers(value, f'{path}[{i}]')
  elif isinstance(tree, (int, float)) and not isinstance(tree, bool):
    yield path, tree


@pytest.fixture(scope='module')
def figures(tmp_path_factory):
  out = tmp_path_factory.mktemp('gpu_run')
  env = {**os.environ, 'OUT': str(out), 'PYTHON': sys.executable}
  done = subprocess.run([os.path.join(ROOT, 'benchmarks', 'gpu_run.sh'), '--tiny',
                         f'--budget-s={BUDGET_S}'], env=env, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  missing = [name for name in FILES if not (out / f'{name}.json').exists()]
  assert not missing, f'no JSON from {missing}:\n' + (out / 'log.txt').read_text()[-4000:]
  return {name: json.loads((out / f'{name}.json').read_text()) for name in FILES}


def test_every_figure_is_present_and_finite(figures):
  for name, tree in figures.items():
    numbers = dict(_numbers(tree))
    assert numbers, name
    assert all(math.isfinite(v) for v in numbers.values()), (name, numbers)
  assert figures['smoke']['versions']['jax'] and figures['smoke']['loss'] > 0
  for name in ('step_bf16', 'step_f32'):
    assert figures[name]['seconds_per_step']['jax step'] > 0
    has_torch = importlib.util.find_spec('torch') is not None
    assert ('jax_over_torch step' in figures[name]) == has_torch
  inference = figures['inference']
  assert inference['device_slic_ms_per_image'] > 0
  assert 0 < inference['full_over_networks_alone']


def test_the_paper_run_reports_every_map_beside_a_baseline_of_one_half(figures):
  run = figures['paper_run']
  steps = run['steps_per_stage']
  for name, step in (('final', steps), ('earlier', steps // 2)):
    result = run[name]
    assert (result['stage1_step'], result['stage2_step']) == (step, step)
    assert set(result['rows']) == {'stage 1', 'stage 2', 'combined'}
    baseline = result['references']['baseline']
    assert baseline['pixel_auroc'] == 0.5 and baseline['image_auroc'] == 0.5
  for stage in ('stage 1', 'stage 2'):
    assert 0 <= run['stages'][stage]['data_wait_fraction'] <= 1


def test_the_sized_steps_fit_the_budget(figures):
  run = figures['paper_run']
  sizing = run['sizing']
  assert sizing['budget_s'] <= BUDGET_S
  planned = sizing['reserve_s'] + run['steps_per_stage'] * sizing['step_s'] * (
      1 + sizing['stage2_cost'])
  assert planned <= sizing['budget_s']
  assert sizing['step_s'] == figures['step_bf16']['seconds_per_step']['jax step']


def test_sizing_rounds_down_and_refuses_a_budget_that_affords_too_little():
  # 1000 s of training at 0.1 s + 0.2 s per step pair: 3333 steps, down to 3300.
  assert paper_run.sized_steps(1100, 0.1, 2.0, 100, 2) == 3300
  assert paper_run.sized_steps(110, 0.1, 2.0, 100, 2) == 32  # 33.3 -> even
  assert paper_run.sized_steps(1100, 0.1, 2.0, 100, 2, max_steps=8) == 8
  with pytest.raises(ValueError, match='affords 1.7 steps per stage'):
    paper_run.sized_steps(100.5, 0.1, 2.0, 100, 2)
