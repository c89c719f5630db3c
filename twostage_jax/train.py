"""Training: TrainState, the pure train step, the loop, restoring.

Two methods share the loop (`config.method`). The two-stage model: stage 1
learns the pseudo-anomaly masks from the images; stage 2 is the same network
and the same step, trained on stage 1's refined input (refine.py) with stage
1 frozen. Bauer's autoencoder is a single network (stage 1) that learns to
reproduce the normal image from a distorted one. Each stage keeps its own
checkpoints under `<workdir>/checkpoints/stage<n>`, so either can resume on
its own.
"""

import functools
import json
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from twostage_jax import checkpoints as checkpoints_lib
from twostage_jax import data
from twostage_jax import losses
from twostage_jax import parallel
from twostage_jax import pipeline
from twostage_jax import prefetch
from twostage_jax import refine
from twostage_jax import synthesis
from twostage_jax import xla_options
from twostage_jax.models import BauerAutoencoder
from twostage_jax.models import SegmentationNet
from twostage_jax.models.segmentation import DATA_AXIS

# (prediction, batch) -> (scalar loss, metrics of this device's share).
Objective = Callable[[jax.Array, dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]]


class TrainState(train_state.TrainState):
  batch_stats: Any


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """`model.compute_dtype`; 'auto' is bfloat16 on GPU/TPU and float32 on CPU.

  bfloat16 halves activation memory and runs on the tensor cores; CPUs have
  no fast bfloat16 convolutions, so float32 stays their default.
  """
  name = config.model.compute_dtype
  if name == 'auto':
    name = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.model.compute_dtype = {name!r} must be 'auto', "
                     f"{' or '.join(map(repr, COMPUTE_DTYPES))}")
  return COMPUTE_DTYPES[name]


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The network of `config.method`: the segmentation net or Bauer's autoencoder.

  Parameters are float32 whatever the compute dtype (mixed precision).
  """
  model = config.model
  if config.method == 'bauer':
    return BauerAutoencoder(
        encoder_widths=tuple(model.encoder_widths),
        sdc_blocks=model.sdc_blocks,
        sdc_filters=model.sdc_filters,
        sdc_dilations=tuple(model.sdc_dilations),
        sdc_kernel=model.sdc_kernel,
        bn_momentum=model.bn_momentum,
        bn_epsilon=model.bn_epsilon,
        dtype=compute_dtype(config))
  return SegmentationNet(
      width=model.width, bn_momentum=model.bn_momentum, bn_epsilon=model.bn_epsilon,
      dtype=compute_dtype(config))


def stage_steps(config: ml_collections.ConfigDict, stage: int) -> int:
  """Training steps of `stage`: `stage2.num_steps` for stage 2 when set, else `train.num_steps`."""
  stage2 = config.get('stage2')
  if stage == 2 and stage2 is not None and stage2.num_steps is not None:
    return stage2.num_steps
  return config.train.num_steps


def learning_rate_schedule(config: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Constant rate, multiplied by `lr_decay_factor` at each decay fraction of `num_steps`."""
  return optax.piecewise_constant_schedule(
      config.learning_rate,
      {int(f * num_steps): config.lr_decay_factor for f in config.lr_decay_fractions})


def prng_key(seed: int) -> jax.Array:
  """A PRNG key of the 'rbg' kind.

  XLA:CPU takes about 2 s to compile each threefry draw, which made the
  initialisation of the network compile for 20-30 s; rbg keys compile in
  a fraction of that. Their streams are deterministic for a given backend.
  """
  return jax.random.key(seed, impl='rbg')


STAGES = (1, 2)
_STAGE_CHOICES = {'both': (1, 2), '1': (1,), '2': (2,)}


def stages_to_train(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The stages `config.stage` asks for: 'both' (1 then 2), '1' or '2'."""
  if config.stage not in _STAGE_CHOICES:
    raise ValueError(f'config.stage = {config.stage!r} must be one of '
                     f'{", ".join(map(repr, _STAGE_CHOICES))}')
  return _STAGE_CHOICES[config.stage]


def stage_loss(config: ml_collections.ConfigDict, stage: int) -> ml_collections.ConfigDict:
  """The two-stage model's loss settings of `stage`.

  Stage 1 uses `loss`; stage 2 uses `loss` with every key that
  `stage2.loss` sets (not None) replaced.
  """
  if stage == 1:
    return config.loss
  merged = config.loss.copy_and_resolve_references()
  for key, value in config.stage2.loss.items():
    if value is not None:
      merged[key] = value
  return merged


def objective(config: ml_collections.ConfigDict, stage: int) -> Objective:
  """The training objective of `stage` of `config.method`.

  Two-stage model: SSIM + L2 against the mask with `stage_loss`. Bauer: the
  masked contrast objective `loss.objective` between the reconstruction and
  the normal image ('target').
  """
  if config.method == 'bauer':
    return lambda prediction, batch: losses.masked_contrast_loss(
        prediction, batch['target'], batch['image'], batch['mask'], config.loss)
  loss_config = stage_loss(config, stage)
  return lambda prediction, batch: losses.ssim_l2_loss(prediction, batch['mask'], loss_config)


def create_train_state(config: ml_collections.ConfigDict, key: jax.Array,
                       stage: int = 1) -> TrainState:
  """Fresh parameters, batch statistics and Adam state for `stage` of `config`."""
  model = create_model(config)
  shape = (1, config.image_size, config.image_size, 3)
  # Jitted: run op by op, init would compile every layer's ops separately.
  init = jax.jit(functools.partial(model.init, train=False))
  variables = init(key, jnp.zeros(shape, jnp.float32))
  return TrainState.create(
      apply_fn=model.apply,
      params=variables['params'],
      batch_stats=variables['batch_stats'],
      tx=optax.adam(learning_rate_schedule(config.train, stage_steps(config, stage))))


def abstract_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                         stage: int = 1) -> TrainState:
  """Shapes, dtypes and replicated shardings of `stage`'s state, for restoring.

  The restored state keeps this one's optimizer, whose schedule depends on
  the stage's number of steps.
  """
  shapes = jax.eval_shape(lambda: create_train_state(config, prng_key(0), stage))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array,
               objective: Objective) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's share of the batch.

  Written per device in the pmap style: gradients, metrics and (inside
  BatchNorm) batch statistics are averaged over the `data` axis, so every
  device ends the step with the same state. `key` is this step's PRNG key;
  neither network has stochastic layers, so it is not drawn from.
  """
  del key

  def loss_fn(params):
    prediction, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        batch['image'], train=True, mutable=['batch_stats'])
    loss, metrics = objective(prediction, batch)
    return loss, (metrics, updates['batch_stats'])

  grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, DATA_AXIS)
  metrics = jax.lax.pmean(metrics, DATA_AXIS)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics


def _store_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """SAIM's SLIC settings and where stores live; all cores build a missing one."""
  return {'n_segments': config.synthesis.saim_n_segments,
          'compactness': config.synthesis.saim_compactness,
          'sigma': config.synthesis.saim_sigma,
          'cache_dir': data.default_cache_dir(config.cache_dir),
          'num_processes': os.cpu_count() or 1}


def anomaly_sources(config: ml_collections.ConfigDict) -> synthesis.SourceStore:
  """The memory-mapped store of the anomaly sources and their SLIC labels.

  Built on the first run on a machine and reused by later runs with the
  same sources and settings.
  """
  return synthesis.build_source_store(config.anomaly_source_dir, config.image_size,
                                      **_store_settings(config))


def make_sampler_factory(config: ml_collections.ConfigDict, stage: int,
                         images: np.ndarray) -> pipeline.SamplerFactory:
  """A picklable factory of the workers' training sampler for `stage`.

  It carries the source stores by their folders, so every worker maps the
  same files instead of receiving a copy. `images` are the normal training
  images (held-out ones excluded): the self sources of
  `synthesis.p_self_source`.
  """
  if config.method == 'bauer':
    return functools.partial(synthesis.TrainingSampler, None, config, stage)
  self_sources = None
  if config.synthesis.p_self_source > 0:
    self_sources = synthesis.build_image_store(images, f'{config.category}-train',
                                               **_store_settings(config))
  return functools.partial(synthesis.TrainingSampler, anomaly_sources(config), config, stage,
                           self_sources)


class _Progress:
  """Prints step, loss, images/s, data wait and ETA; appends them to metrics.jsonl.

  The first step of a (re)started run includes compilation, so it reports
  its duration instead of a throughput.
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, stage: int,
               start_step: int):
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._stage = stage
    self._num_steps = stage_steps(config, stage)
    self._schedule = learning_rate_schedule(config.train, self._num_steps)
    self._batch = config.train.global_batch_size
    self._writes = jax.process_index() == 0
    self._last_step = start_step
    self._last_time = time.perf_counter()

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


def checkpoint_dir(workdir: str, stage: int) -> str:
  return os.path.join(workdir, 'checkpoints', f'stage{stage}')


def restore_state(config: ml_collections.ConfigDict, workdir: str, stage: int,
                  mesh: jax.sharding.Mesh, step: int = -1) -> tuple[TrainState, int]:
  """The state of `stage` at `step` (-1: the latest), replicated over `mesh`.

  Raises:
    FileNotFoundError: naming the folder searched, if there is no checkpoint.
  """
  checkpoints = checkpoints_lib.Checkpoints(
      checkpoint_dir(workdir, stage), config.train, read_only=True)
  try:
    step = checkpoints.latest_step() if step < 0 else step
    if step is None:
      raise FileNotFoundError(
          f'no stage-{stage} checkpoint in {checkpoints.directory} (workdir '
          f'{os.path.abspath(workdir)}); train it first (--mode=train) or point '
          '--workdir at a trained run')
    return checkpoints.restore(step, abstract_train_state(config, mesh, stage)), step
  finally:
    checkpoints.close()


def variables_of(state: TrainState) -> dict[str, Any]:
  """What inference needs of a state: params and BatchNorm statistics."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def training_images(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """uint8 (training, held-out) normal images of the configured category.

  The held-out share (`calibration.holdout_fraction`) never reaches training;
  it calibrates the decision thresholds.
  """
  images = data.category_train_images(config)
  kept, held_out = data.split_holdout(
      len(images), config.calibration.holdout_fraction, config.seed)
  return images[kept], images[held_out]


def train(config: ml_collections.ConfigDict, workdir: str, stage: int) -> TrainState:
  """Trains `stage` on every device of every process; resumes from `workdir`.

  Stage 2 needs stage 1's latest checkpoint in the same workdir.
  """
  if stage not in STAGES:
    raise ValueError(f'stage must be one of {STAGES}, got {stage}')
  mesh = parallel.make_mesh()
  local_batch = parallel.local_batch_size(config.train.global_batch_size)
  images, held_out = training_images(config)
  logging.info('stage %d: training on %d images of %s/%s at %dx%d (%d held out for '
               'thresholds) in %s; anomaly sources: %s', stage, len(images),
               data.resolve_data_dir(config), config.category, config.image_size,
               config.image_size, len(held_out), jnp.dtype(compute_dtype(config)).name,
               synthesis.describe_sources(config.anomaly_source_dir))

  stage1_variables = None
  if stage == 2:
    stage1, stage1_step = restore_state(config, workdir, 1, mesh)
    logging.info('stage 2 refines the frozen stage 1 of step %d', stage1_step)
    stage1_variables = variables_of(stage1)
    to_stage2 = parallel.per_shard(
        functools.partial(refine.stage2_batch, create_model(config).apply,
                          config=config.refine), mesh, xla_options.compiler_options(config))

  checkpoints = checkpoints_lib.Checkpoints(checkpoint_dir(workdir, stage), config.train)
  start_step = checkpoints.latest_step() or 0
  if start_step:
    state = checkpoints.restore(start_step, abstract_train_state(config, mesh, stage))
    logging.info('stage %d resumed from the checkpoint at step %d', stage, start_step)
  else:
    key = jax.random.fold_in(prng_key(config.seed), stage)
    state = jax.device_put(create_train_state(config, key, stage), parallel.replicated(mesh))
  num_steps = stage_steps(config, stage)
  if start_step >= num_steps:
    checkpoints.close()
    return state

  plan = pipeline.BatchPlan(
      num_images=len(images),
      global_batch_size=config.train.global_batch_size,
      local_batch_size=local_batch,
      process_index=jax.process_index(),
      seed=config.seed,
      stream=stage)
  host_batches = pipeline.batches(
      images, make_sampler_factory(config, stage, images), plan, start_step,
      num_steps, config.train.num_workers, config.train.prefetch_batches)
  step_fn = parallel.data_parallel(
      functools.partial(train_step, objective=objective(config, stage)), mesh,
      xla_options.compiler_options(config))
  step_key = jax.random.fold_in(prng_key(config.seed + 1), stage)
  progress = _Progress(workdir, config, stage, start_step)

  clock = prefetch.DataWaitClock()
  device_batches = prefetch.prefetch(
      host_batches, functools.partial(parallel.to_global_batch, mesh=mesh),
      config.train.device_prefetch, clock)
  for step, batch in enumerate(device_batches, start=start_step):
    if stage1_variables is not None:
      batch = to_stage2(stage1_variables, batch)
    state, metrics = step_fn(state, batch, jax.random.fold_in(step_key, step))
    # One step in flight: the time the next fetch blocks is device idle time.
    metrics = jax.block_until_ready(metrics)
    done = step + 1
    if step == start_step:
      clock.reset()  # the first fetch waited for the workers to start
    if step == start_step or done % config.train.log_every == 0 or done == num_steps:
      progress.log(done, metrics, clock, first=step == start_step)
    if done % config.train.checkpoint_every == 0 or done == num_steps:
      checkpoints.save(done, state, config)
  logging.info('stage %d: the training loop waited for data %.1f%% of its wall time',
               stage, 100 * clock.total_fraction())
  checkpoints.close()
  return state
