"""Training progress: a log line per interval, a record in metrics.jsonl and TensorBoard."""

import json
import time

import jax
import ml_collections
import optax
from absl import logging

from twostage_jax.runtime import prefetch
from twostage_jax.training import schedules
from twostage_jax.training import summaries
from twostage_jax.workdir import paths


class Progress:
  """Prints step, loss, images/s, data wait and ETA; appends them to metrics.jsonl.

  The first step of a (re)started run includes compilation, so it reports
  its duration instead of a throughput. `summary` gets the same numbers as
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
