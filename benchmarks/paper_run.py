"""Trains both stages for as many steps as a time budget allows, then evaluates them.

  python benchmarks/paper_run.py --budget-s=200 --step-json=OUT/step_bf16.json \
      --workdir=/tmp/paper_run --json=OUT/paper_run.json -- \
      --config=configs/mvtec.py --config.data_dir=... --config.category=bottle ...

The GPU run's training phase (benchmarks/gpu_run.sh). The steps per stage
are sized from the stage-1 step time just measured (`--step-json`, written
by benchmarks/train_step.py): each stage gets N steps, where stage 1 costs
the measured step time, stage 2 `--stage2-cost` times it (its step also runs
stage 1 and the device SLIC), and `--reserve-s` is kept for start-up,
compilation and the two evaluations. The schedule's decay follows N (80% and
90% of each stage). `main.py` trains and evaluates the final checkpoints
(the reported rows, with the baseline rows); the checkpoints at N/2 are
evaluated as well, only to show whether the maps were still improving. The
JSON also records each stage's seconds per step and data-wait share.
"""

import json
import math
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def sized_steps(budget_s: float, step_s: float, stage2_cost: float, reserve_s: float,
                min_steps: int, max_steps: int | None = None) -> int:
  """Steps per stage that fit the budget: an even number, rounded down to 100s above 1000."""
  per_stage = (budget_s - reserve_s) / (step_s * (1.0 + stage2_cost))
  steps = int(per_stage) // 2 * 2
  if steps >= 1000:
    steps = steps // 100 * 100
  if steps < min_steps:
    raise ValueError(f'a budget of {budget_s} s affords {per_stage:.1f} steps per stage at '
                     f'{step_s:.4f} s per stage-1 step (x{stage2_cost} in stage 2, '
                     f'{reserve_s} s reserved); at least {min_steps} are needed')
  return steps if max_steps is None else min(steps, max_steps)


def stage_figures(workdir: str) -> dict[str, dict[str, float]]:
  """Per stage: seconds per step between its first and last log line, mean data-wait share."""
  lines = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      lines.setdefault(record['stage'], []).append(record)
  figures = {}
  for stage, records in lines.items():
    first, last = records[0], records[-1]
    waits = [r['data_wait_fraction'] for r in records if 'data_wait_fraction' in r]
    figures[f'stage {stage}'] = {
        'seconds_per_step': (last['time'] - first['time']) / max(last['step'] - first['step'], 1),
        'data_wait_fraction': sum(waits) / len(waits) if waits else math.nan}
  return figures


def _main(config_args: list[str], overrides: list[str], log: str) -> float:
  """Runs main.py with the config and overrides, its output to `log`; the seconds it took."""
  command = [sys.executable, 'main.py', *config_args, *overrides]
  start = time.perf_counter()
  with open(log, 'w') as f:
    subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=True)
  return time.perf_counter() - start


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, 'eval', 'metrics.json')) as f:
    metrics = json.load(f)
  return {key: metrics[key] for key in ('stage1_step', 'stage2_step', 'rows', 'references',
                                        'flagged', 'num_images', 'num_anomalous')}


def main(argv):
  config_args = argv[1:]
  with open(FLAGS['step-json'].value) as f:
    step_s = json.load(f)['seconds_per_step'][FLAGS['step-name'].value]
  steps = sized_steps(FLAGS['budget-s'].value, step_s, FLAGS['stage2-cost'].value,
                      FLAGS['reserve-s'].value, FLAGS['min-steps'].value,
                      FLAGS['max-steps'].value)
  workdir = FLAGS.workdir
  if os.path.exists(workdir) and os.listdir(workdir):
    raise SystemExit(f'--workdir {workdir} is not empty: the run would resume another one')
  train = [f'--workdir={workdir}', f'--config.train.num_steps={steps}',
           f'--config.train.checkpoint_every={steps // 2}', '--config.train.keep_checkpoints=2']
  print(f'{steps} steps per stage ({step_s * 1e3:.1f} ms per stage-1 step measured)', flush=True)
  figures = {'command': ['main.py', *config_args, *train], 'steps_per_stage': steps,
             'sizing': {'budget_s': FLAGS['budget-s'].value, 'step_s': step_s,
                        'stage2_cost': FLAGS['stage2-cost'].value,
                        'reserve_s': FLAGS['reserve-s'].value}}
  figures['train_and_evaluate_s'] = _main(config_args, train, f'{workdir}.train.log')
  figures['final'] = _results(workdir)
  figures['stages'] = stage_figures(workdir)
  earlier = [f'--workdir={workdir}', '--mode=evaluate', f'--config.eval.stage1_step={steps // 2}',
             f'--config.eval.stage2_step={steps // 2}']
  figures['earlier_evaluate_s'] = _main(config_args, earlier, f'{workdir}.earlier.log')
  figures['earlier'] = _results(workdir)
  with open(FLAGS.json, 'w') as f:
    json.dump(figures, f, indent=1)
  for name in ('final', 'earlier'):
    rows = {**figures[name]['rows'], **figures[name]['references']}
    print(f'{name} (stage-1 step {figures[name]["stage1_step"]}, stage-2 step '
          f'{figures[name]["stage2_step"]}): ' + '; '.join(
              f'{row} {r["pixel_auroc"]:.4f}/{r["image_auroc"]:.4f}' for row, r in rows.items()))


def _define_flags() -> None:
  """Defined when run as a script only, so that importing `sized_steps` defines no flags."""
  flags.DEFINE_float('budget-s', None, 'Seconds for the whole phase.', required=True)
  flags.DEFINE_string('step-json', None, "benchmarks/train_step.py's JSON (the step time).",
                      required=True)
  flags.DEFINE_string('step-name', 'jax step', 'Which timed step of --step-json sizes the run.')
  flags.DEFINE_float('stage2-cost', 2.0, "A stage-2 step's time over a stage-1 step's.")
  flags.DEFINE_float('reserve-s', 100.0, 'Seconds kept for start-up, compilation and evaluation.')
  flags.DEFINE_integer('min-steps', 2, 'Fewest steps per stage; the budget must afford them.')
  flags.DEFINE_integer('max-steps', None, 'Most steps per stage, whatever the budget affords.')
  flags.DEFINE_string('workdir', None, 'Workdir of the run (must not hold a run).',
                      required=True)
  flags.DEFINE_string('json', None, 'Write the figures to this JSON file.', required=True)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
