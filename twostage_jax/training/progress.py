"""Training progress: a log line per interval, a record in metrics.jsonl and TensorBoard."""

import json
import os
import time

import jax
import ml_collections
import optax
from absl import logging

from twostage_jax.runtime import prefetch
from twostage_jax.training import schedules
from twostage_jax.training import summaries
from twostage_jax.workdir import atomic_write
from twostage_jax.workdir import paths


class Progress:
  """Prints step, loss, images/s, data wait and ETA; appends them to metrics.jsonl.

  The first step of a (re)started run includes compilation, so it reports
  its duration instead of a throughput. A resumed stage first drops its
  records after the checkpoint it resumes from (they are trained again), so
  metrics.jsonl holds each step once. `summary` gets the same numbers as
  TensorBoard scalars.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, stage: int,
               start_step: int, learning_rate: optax.Schedule,
               summary: summaries.Writer | None = None):
    """`learning_rate`: the schedule the stage's optimizer follows (Method.learning_rate)."""
    self._path = paths.metrics_log(workdir)
    self._stage = stage
    self._num_steps = schedules.stage_steps(config, stage)
    self._schedule = learning_rate
    self._batch = config.train.global_batch_size
    self._writes = jax.process_index() == 0
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._summary = summary
    if self._writes:
      _drop_records_after(self._path, stage, start_step)

  def log(self, step: int, metrics: dict[str, jax.Array], clock: prefetch.DataWaitClock,
          first: bool = False) -> None:
    record = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    elapsed = now - self._last_time
    steps_per_s = (step - self._last_step) / max(elapsed, 1e-9)
    self._last_step, self._last_time = step, now
    record.update(stage=self._stage, step=step, learning_rate=float(self._schedule(step - 1)),
                  time=time.time())
    terms = ', '.join(f'{k} {record[k]:.4f}' for k in sorted(metrics) if k != 'loss')
    message = 'stage %d step %d/%d  loss %.4f  (%s)' % (
        self._stage, step, self._num_steps, record['loss'], terms)
    if first:
      message += '  compiled and ran in %.1f s' % elapsed
    else:
      record['images_per_s'] = steps_per_s * self._batch
      record['data_wait_fraction'] = clock.interval_fraction()
      eta = (self._num_steps - step) / max(steps_per_s, 1e-9)
      message += '  %.1f images/s  data wait %.1f%%  ETA %s' % (
          record['images_per_s'], 100 * record['data_wait_fraction'],
          time.strftime('%H:%M:%S', time.gmtime(eta)))
    logging.info(message)
    if self._writes:
      with open(self._path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    if self._summary is not None:
      self._summary.scalars(step, record)


def _drop_records_after(path: str, stage: int, step: int) -> None:
  """Rewrites metrics.jsonl without `stage`'s records after `step` or torn lines.

  A run killed after its last checkpoint logged steps it will train again;
  a kill in the middle of a write leaves a partial last line.
  """
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and record.get('stage') == stage and record.get('step', 0) > step:
      continue
    kept.append(line)
  if kept != lines:
    atomic_write.write_text(path, ''.join(line + '\n' for line in kept))
