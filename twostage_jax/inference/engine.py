"""Inference: trained checkpoints -> anomaly maps and image scores.

The method (methods/) gives the maps of its trained stages and any host-side
inputs they need (the two-stage model's SLIC labels, computed ahead in worker
processes); every map is then Gaussian-smoothed by `eval.map_sigma`.
Networks run on this process's devices, the images split over them.
"""

import dataclasses
import functools
import json
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from twostage_jax import methods
from twostage_jax.methods import base
from twostage_jax.runtime import parallel
from twostage_jax.runtime import xla_options
from twostage_jax.runtime.parallel import DATA_AXIS
from twostage_jax.training import train_state
from twostage_jax.workdir import paths

Variables = train_state.Variables


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """Host copies of the trained variables of stages 1..n of a method, and their steps.

  `method` is the plug-in they belong to, resolved once when the model is
  loaded; `final_map` names the map decisions are made on (`Method.final_map`).
  """

  method: base.Method
  variables: tuple[Variables, ...]
  stage_steps: tuple[int, ...]
  final_map: str

  @property
  def trained(self) -> tuple[int, ...]:
    """The trained stages."""
    return tuple(range(1, len(self.variables) + 1))

  @property
  def steps(self) -> dict[str, int | None]:
    """'stage<n>_step' of every stage of the method; None for an untrained one."""
    return {f'stage{stage}_step': (self.stage_steps[stage - 1]
                                   if stage <= len(self.stage_steps) else None)
            for stage in self.method.stages}


def fresh_model(config: ml_collections.ConfigDict,
                stages: tuple[int, ...] | None = None) -> TrainedModel:
  """A model of freshly initialised `stages` (all the method's when None), step 0 each.

  For what does not depend on the weights: speed measurements and checks
  of a detector's export against the model it was made from.
  """
  method = methods.get(config.method)
  stages = method.stages if stages is None else stages
  variables = tuple(jax.device_get(train_state.variables_of(
      method.create_state(config, train_state.prng_key(stage), stage))) for stage in stages)
  return TrainedModel(method, variables, tuple(0 for _ in stages),
                      method.final_map(config, stages))


def _stage_step(config: ml_collections.ConfigDict, workdir: str, stage: int,
                recorded: dict[str, int]) -> int:
  """The checkpoint step of `stage` to load: explicit, recorded by a later stage, or newest.

  Raises:
    FileNotFoundError: if the checkpoint a later stage was trained on is gone.
  """
  explicit = config.eval.get(f'stage{stage}_step', -1)
  key = f'stage{stage}_step'
  if explicit >= 0:
    if key in recorded and recorded[key] != explicit:
      logging.warning(
          'eval.%s = %d, but the later stage was trained on stage %d of step %d: '
          'this pair was not trained together', key, explicit, stage, recorded[key])
    return explicit
  if key not in recorded:
    return -1
  if not train_state.has_checkpoint_at(workdir, stage, recorded[key]):
    raise FileNotFoundError(
        f'stage {stage + 1} of {workdir} was trained on the stage-{stage} checkpoint of step '
        f'{recorded[key]}, which is gone from {paths.stage_checkpoints(workdir, stage)}; '
        f'set --config.eval.{key}=<step> to pair it with another one')
  logging.info('using the stage-%d checkpoint of step %d, which the later stage was trained on',
               stage, recorded[key])
  return recorded[key]


def load_model(config: ml_collections.ConfigDict, workdir: str) -> TrainedModel:
  """Restores the method's trained stages from `workdir`.

  The last trained stage is loaded first (`eval.stage<n>_step`, or its
  newest intact checkpoint); the stages it is built on are the checkpoints
  it records having been trained on, unless `eval.stage<n>_step` says
  otherwise. A stage without checkpoints ends the list.

  Raises:
    FileNotFoundError: naming the workdir, if stage 1 has no checkpoint.
  """
  method = methods.get(config.method)
  mesh = parallel.make_mesh()
  trained = []
  for stage in method.stages:
    if not train_state.has_checkpoint(workdir, stage):
      break
    trained.append(stage)
  if trained and len(trained) < len(method.stages):
    missing = len(trained) + 1
    logging.warning('no stage-%d checkpoint in %s: using stages up to %d', missing,
                    paths.stage_checkpoints(workdir, missing), trained[-1])
  last = trained[-1] if trained else 1  # restoring stage 1 names the missing folder
  variables, steps, recorded = {}, {}, {}
  for stage in range(last, 0, -1):
    state, step = train_state.restore_state(method, config, workdir, stage, mesh,
                                            _stage_step(config, workdir, stage, recorded))
    variables[stage], steps[stage] = parallel.to_host(train_state.variables_of(state)), step
    recorded.update(train_state.provenance(config, workdir, stage, step))
  stages = tuple(sorted(variables))
  return TrainedModel(method, tuple(variables[s] for s in stages),
                      tuple(steps[s] for s in stages), method.final_map(config, stages))


def mean_filter_max(maps: jax.Array, size: int) -> jax.Array:
  """Image scores: max of the size x size mean-filtered maps (zeros outside)."""
  window = (1, size, size)
  summed = jax.lax.reduce_window(maps, 0.0, jax.lax.add, window, (1, 1, 1), 'SAME')
  return (summed / (size * size)).max(axis=(1, 2))


def _gaussian_taps(sigma: float) -> np.ndarray:
  """Normalised Gaussian taps spanning ceil(3 sigma) pixels each side."""
  radius = int(np.ceil(3 * sigma))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  return taps / taps.sum()


def _smooth_axis(maps: jax.Array, taps: np.ndarray, axis: int) -> jax.Array:
  """One 1-D pass along `axis`, borders reflected (d c b a | a b c d)."""
  radius, size = len(taps) // 2, maps.shape[axis]
  pad = [(0, 0)] * maps.ndim
  pad[axis] = (radius, radius)
  padded = jnp.pad(maps, pad, mode='symmetric')
  out = maps
  for offset, tap in enumerate(taps):
    if offset != radius:
      shifted = jax.lax.slice_in_dim(padded, offset, offset + size, axis=axis)
      out = out + float(tap) * (shifted - maps)
  return out


def smooth(maps: jax.Array, sigma: float) -> jax.Array:
  """Gaussian smoothing of (B, H, W) maps with reflected borders; sigma 0: none.

  Reflection (scipy.ndimage's default mode) keeps every pixel's weights
  on map values: zero padding would lower the map near the border, a prior
  that defects lie in the middle, and a constant map would score like a
  detector. Each pass adds the taps' weighted differences to the map, so a
  constant map stays exactly (bit for bit) constant.
  """
  if sigma == 0:
    return maps
  taps = _gaussian_taps(sigma)
  return _smooth_axis(_smooth_axis(maps, taps, 1), taps, 2)


def score_fn(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """Pure (B, H, W) maps -> (B,) image scores by `eval.score_rule`.

  'mean_filter_max': the max of the `eval.score_filter_size` mean-filtered
  map (the papers' rule); 'max': the map's maximum.
  """
  if config.eval.score_rule == 'max':
    return lambda maps: maps.max(axis=(1, 2))
  return functools.partial(mean_filter_max, size=config.eval.score_filter_size)


def maps_and_scores_fn(method: base.Method, config: ml_collections.ConfigDict,
                       trained: tuple[int, ...]):
  """Pure (variables, batch) -> ({map name: (B, H, W)}, {map name: (B,)}) for uint8 images.

  Every reported map is smoothed by `eval.map_sigma`; a method's own steps
  (the two-stage refinement) read its raw maps, as in training. A map's
  image score is the method's own (`Method.scores_fn`) where it gives one,
  else `eval.score_rule` of the smoothed map. This is what every map and
  score reported anywhere comes from: `compiled_maps_and_scores` compiles it
  for evaluation, calibration, the detector and TensorBoard, and the export
  lowers it (or, split around a host step, `split_maps_and_scores_fns`).
  """
  method_maps = method.maps_fn(config, trained)
  report = _reported(method, config, trained)

  def maps_and_scores(variables, batch):
    batch = _in_unit_range(batch)
    return report(variables, batch, method_maps(variables, batch))

  return maps_and_scores


def split_maps_and_scores_fns(method: base.Method, config: ml_collections.ConfigDict,
                              trained: tuple[int, ...], split: base.HostSplit):
  """`maps_and_scores_fn` in the two pure parts of `split`, around its host step.

  Returns:
    first: (variables, batch of uint8 images) -> `split.before`'s arrays;
    second: (variables, batch of the uint8 images, those arrays and the host
      step's) -> (maps, scores) by name, as `maps_and_scores_fn` gives them.
  """
  report = _reported(method, config, trained)

  def first(variables, batch):
    return split.before(variables, _in_unit_range(batch))

  def second(variables, batch):
    batch = _in_unit_range(batch)
    return report(variables, batch, split.after(variables, batch))

  return first, second


def _in_unit_range(batch):
  return {**batch, 'image': batch['image'].astype(jnp.float32) / 255.0}


def _reported(method: base.Method, config: ml_collections.ConfigDict,
              trained: tuple[int, ...]):
  """(variables, batch, raw maps) -> (smoothed maps, image scores) by map name."""
  method_scores = method.scores_fn(config, trained)
  rule = score_fn(config)

  def report(variables, batch, raw):
    maps = {name: smooth(m, config.eval.map_sigma) for name, m in raw.items()}
    scores = {} if method_scores is None else method_scores(variables, batch, raw)
    return maps, {name: scores[name] if name in scores else rule(m) for name, m in maps.items()}

  return report


def compiled_maps_and_scores(method: base.Method, config: ml_collections.ConfigDict,
                             trained: tuple[int, ...], mesh: Mesh):
  """`maps_and_scores_fn` compiled per device of `mesh`: replicated variables, split batch.

  Kept per (method, config, stages, mesh), so later calls reuse the compilation.
  """
  return _compiled(method, config.to_json(), trained, mesh)


@functools.lru_cache(maxsize=8)
def _compiled(method: base.Method, config_json: str, trained: tuple[int, ...], mesh: Mesh):
  config = ml_collections.ConfigDict(json.loads(config_json))
  return parallel.per_shard(maps_and_scores_fn(method, config, trained), mesh,
                            xla_options.compiler_options(config))


def local_mesh() -> Mesh:
  """A one-axis mesh over this process's devices, which inference splits images over."""
  return Mesh(np.array(jax.local_devices()), (DATA_AXIS,))


def maps_and_scores(config: ml_collections.ConfigDict, model: TrainedModel,
                    images: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """float32 (N, H, W) maps and (N,) image scores of uint8 (N, H, W, 3) images, by map name.

  The names and their order are the method's (the two-stage model: 'stage
  1', and with a trained stage 2 also 'stage 2' and 'combined'). Batches of
  `eval.batch_size` (rounded up to a multiple of the local devices) are split
  over this process's devices (`local_mesh`; variables already placed there
  stay); the last one is padded. Host inputs of later batches are computed
  while the device maps earlier ones.
  """
  mesh = local_mesh()
  devices = mesh.devices.size
  batch_size = -(-config.eval.batch_size // devices) * devices
  infer = compiled_maps_and_scores(model.method, config, model.trained, mesh)
  variables = jax.device_put(model.variables, parallel.replicated(mesh))
  host_inputs = model.method.host_inputs(
      config, model.trained, images, batch_size, config.train.num_workers)
  map_parts, score_parts = [], []
  for start, extra in zip(range(0, len(images), batch_size), host_inputs):
    batch = {'image': images[start:start + batch_size], **extra}
    count = len(batch['image'])
    batch = {k: np.concatenate([v, np.zeros((batch_size - count,) + v.shape[1:], v.dtype)])
             for k, v in batch.items()}
    maps, scores = infer(variables, jax.device_put(batch, parallel.batch_sharded(mesh)))
    map_parts.append({k: np.asarray(v)[:count] for k, v in maps.items()})
    score_parts.append({k: np.asarray(v)[:count] for k, v in scores.items()})
  names = model.method.map_names(config, model.trained)
  return ({k: np.concatenate([p[k] for p in map_parts]) for k in names},
          {k: np.concatenate([p[k] for p in score_parts]) for k in names})


def anomaly_maps(config: ml_collections.ConfigDict, model: TrainedModel,
                 images: np.ndarray) -> dict[str, np.ndarray]:
  """The maps of `maps_and_scores`."""
  return maps_and_scores(config, model, images)[0]


def image_scores(config: ml_collections.ConfigDict, maps: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
  """(N,) image scores of every map by `eval.score_rule` (see score_fn)."""
  score = jax.jit(score_fn(config))
  return {k: np.asarray(score(v)) for k, v in maps.items()}
