"""Where every file of a workdir lives: the one module that spells its layout.

  <workdir>/config.json                  the config it was trained with (run_config.py)
  <workdir>/.lock                        one run at a time (lock.py)
  <workdir>/.lock.takeover               serialises takeovers of a stale lock
  <workdir>/checkpoints/stage<n>/<step>/ Orbax checkpoints of stage n
  <workdir>/checkpoints/thresholds.json  decision thresholds (inference/calibration.py)
  <workdir>/metrics.jsonl                training metrics (training/progress.py)
  <workdir>/tensorboard/stage<n>/        TensorBoard event files (training/summaries.py)
  <workdir>/eval/                        metrics.json, report.md, plots (evaluation/)
  <workdir>/export/                      the exported detector (inference/detector.py)
  <workdir>/predictions/                 --mode=predict's output unless configured
  <workdir>/<category>/                  a whole workdir per category (category=all)
"""

import os

CHECKPOINTS = 'checkpoints'


def config_file(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def lock_file(workdir: str) -> str:
  return os.path.join(workdir, '.lock')


def lock_takeover_file(workdir: str) -> str:
  return os.path.join(workdir, '.lock.takeover')


def checkpoints_dir(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS)


def stage_checkpoints(workdir: str, stage: int) -> str:
  """The folder of stage `stage`'s checkpoints, one subfolder per step."""
  return os.path.join(workdir, CHECKPOINTS, f'stage{stage}')


def thresholds_file(workdir: str) -> str:
  return os.path.join(workdir, CHECKPOINTS, 'thresholds.json')


def data_contents_file(workdir: str) -> str:
  """What the training data held (data/fingerprint.py), to recognise it elsewhere."""
  return os.path.join(workdir, 'data_contents.json')


def metrics_log(workdir: str) -> str:
  return os.path.join(workdir, 'metrics.jsonl')


def tensorboard_dir(workdir: str, stage: int) -> str:
  return os.path.join(workdir, 'tensorboard', f'stage{stage}')


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, 'eval')


def export_dir(workdir: str) -> str:
  return os.path.join(workdir, 'export')


def predictions_dir(workdir: str) -> str:
  return os.path.join(workdir, 'predictions')


def category_workdir(workdir: str, category: str) -> str:
  return os.path.join(workdir, category)
