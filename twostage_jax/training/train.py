"""The training loop: trains one stage of any method on every device, resumably.

The method (its plug-in, methods/) gives the network, the objective, the
host sampler and, for stages built on earlier ones, the device-side turn of
a batch that reads their frozen variables. Each stage keeps its own
checkpoints under `<workdir>/checkpoints/stage<n>`; a stage built on earlier
ones records which of their checkpoints it was trained on.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from twostage_jax import data
from twostage_jax.methods import base
from twostage_jax.runtime import parallel
from twostage_jax.runtime import pipeline
from twostage_jax.runtime import prefetch
from twostage_jax.runtime import xla_options
from twostage_jax.training import precision
from twostage_jax.training import progress
from twostage_jax.training import schedules
from twostage_jax.training import summaries
from twostage_jax.training import train_state
from twostage_jax.workdir import checkpoints as checkpoints_lib
from twostage_jax.workdir import paths


def stages_to_train(method: base.Method, config: ml_collections.ConfigDict
                    ) -> tuple[int, ...]:
  """The stages `config.stage` asks for: 'both' (all of `method`'s, in order) or one."""
  stages = method.stages
  if config.stage == 'both':
    return stages
  if config.stage not in tuple(map(str, stages)):
    raise ValueError(f'config.stage = {config.stage!r} must be one of '
                     f"{', '.join(map(repr, ('both',) + tuple(map(str, stages))))}")
  return (int(config.stage),)


def train(method: base.Method, config: ml_collections.ConfigDict, workdir: str,
          stage: int) -> Any:
  """Trains `method`'s `stage` on every device of every process; resumes from `workdir`.

  A stage built on earlier ones (stage 2 of the two-stage model) uses their
  newest intact checkpoints in the same workdir.
  """
  if stage not in method.stages:
    raise ValueError(f'{method.name} trains stages {method.stages}, not {stage}')
  mesh = parallel.make_mesh()
  local_batch = parallel.local_batch_size(config.train.global_batch_size)
  images, held_out = data.training_images(config)
  logging.info('stage %d of %s: training on %d images of %s/%s at %dx%d (%d held out for '
               'thresholds) in %s', stage, method.name, len(images),
               data.resolve_data_dir(config), config.category, config.image_size,
               config.image_size, len(held_out),
               jnp.dtype(precision.compute_dtype(config)).name)

  checkpoints = checkpoints_lib.Checkpoints(paths.stage_checkpoints(workdir, stage),
                                            config.train)
  target = train_state.abstract_train_state(method, config, mesh, stage)
  restored = checkpoints.restore_latest(target)
  provenance = {}
  if restored is not None:
    state, start_step = restored
    provenance = checkpoints.provenance(start_step) or {}
    logging.info('stage %d resumed from the checkpoint at step %d', stage, start_step)
  else:
    start_step = 0
    key = jax.random.fold_in(train_state.prng_key(config.seed), stage)
    state = jax.device_put(train_state.create_train_state(method, config, key, stage),
                           parallel.replicated(mesh))
  num_steps = schedules.stage_steps(config, stage)
  if start_step >= num_steps:
    checkpoints.close()
    return state

  frozen, provenance = _frozen_stages(config, workdir, method, stage, mesh, provenance)
  stage_batch = method.stage_batch(config, stage)
  if stage_batch is not None:
    stage_batch = parallel.per_shard(stage_batch, mesh, xla_options.compiler_options(config))

  plan = pipeline.BatchPlan(
      num_images=len(images),
      global_batch_size=config.train.global_batch_size,
      local_batch_size=local_batch,
      process_index=jax.process_index(),
      seed=config.seed,
      stream=stage)
  host_batches = pipeline.batches(
      images, method.sampler_factory(config, stage, images), plan, start_step,
      num_steps, config.train.num_workers, config.train.prefetch_batches)
  step_fn = parallel.data_parallel(method.train_step(config, stage), mesh,
                                   xla_options.compiler_options(config))
  step_key = jax.random.fold_in(train_state.prng_key(config.seed + 1), stage)
  summary = summaries.Writer(method, workdir, config, stage, start_step, held_out, mesh)
  log = progress.Progress(workdir, config, stage, start_step,
                          method.learning_rate(config, stage), summary)

  clock = prefetch.DataWaitClock()
  device_batches = prefetch.prefetch(
      host_batches, functools.partial(parallel.to_global_batch, mesh=mesh),
      config.train.device_prefetch, clock)
  for step, batch in enumerate(device_batches, start=start_step):
    if stage_batch is not None:
      batch = stage_batch(frozen, batch)
    if step == 0:
      summary.samples(batch)
    state, metrics = step_fn(state, batch, jax.random.fold_in(step_key, step))
    # One step in flight: the time the next fetch blocks is device idle time.
    metrics = jax.block_until_ready(metrics)
    done = step + 1
    if step == start_step:
      clock.reset()  # the first fetch waited for the workers to start
    if step == start_step or done % config.train.log_every == 0 or done == num_steps:
      log.log(done, metrics, clock, first=step == start_step)
    if done % config.train.checkpoint_every == 0 or done == num_steps:
      checkpoints.save(done, state, config, provenance=provenance or None)
      summary.checkpoint(done, frozen + (train_state.variables_of(state),))
  logging.info('stage %d: the training loop waited for data %.1f%% of its wall time',
               stage, 100 * clock.total_fraction())
  summary.close()
  checkpoints.close()
  return state


def _frozen_stages(config: ml_collections.ConfigDict, workdir: str, method: base.Method,
                   stage: int, mesh: jax.sharding.Mesh, provenance: dict[str, int]
                   ) -> tuple[tuple[train_state.Variables, ...], dict[str, int]]:
  """The variables of the earlier stages `stage` is built on, and their steps.

  A fresh stage takes their newest intact checkpoints; a resumed one the
  checkpoints it started on, which its checkpoints record.
  """
  frozen = []
  steps = {}
  for earlier in method.frozen_stages(stage):
    key = f'stage{earlier}_step'
    state, step = train_state.restore_state(method, config, workdir, earlier, mesh,
                                            provenance.get(key, -1))
    logging.info('stage %d is built on the frozen stage %d of step %d', stage, earlier, step)
    frozen.append(train_state.variables_of(state))
    steps[key] = step
  return tuple(frozen), steps
