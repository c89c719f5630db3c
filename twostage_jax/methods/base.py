"""The interface through which a method plugs into the shared machinery.

The training loop, inference, evaluation, calibration and config checks
only talk to a `Method`; they never ask which one it is. A method is one
module under `methods/` that subclasses `Method` and is listed in the
registry (`methods/__init__.py`).
"""

import abc
import dataclasses
import functools
from collections.abc import Iterator
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from twostage_jax.runtime import pipeline
from twostage_jax.training import network_state
from twostage_jax.training import schedules
from twostage_jax.training import train_step as default_step

Variables = network_state.Variables
Batch = default_step.Batch
Objective = default_step.Objective
# (variables of the frozen earlier stages, batch) -> the batch the stage trains on.
StageBatchFn = Callable[[tuple[Variables, ...], Batch], Batch]
# (variables of the trained stages in order, batch) -> {map name: (B, H, W)} for
# one device's images; batch['image'] is float32 in [0, 1].
MapsFn = Callable[[tuple[Variables, ...], Batch], dict[str, jax.Array]]
# (variables, batch, the MapsFn's maps) -> {map name: (B,) image scores} for the
# maps whose image score the method computes itself.
ScoresFn = Callable[[tuple[Variables, ...], Batch, dict[str, jax.Array]],
                    dict[str, jax.Array]]
# (config key, predicate on its value, what the value must be).
Rule = tuple[str, Callable[[Any], bool], str]
# (uint8 images, the first part's outputs as NumPy) -> the host step's outputs.
HostStep = Callable[[np.ndarray, dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class HostSplit:
  """A method's maps as two device parts with a host step between them.

  For exports that cannot hold a step of the maps (the ONNX graphs cannot
  hold the two-stage model's device SLIC): `before` maps a batch ('image'
  float in [0, 1]) to named arrays; the host step (`Method.host_step` of
  `settings`) turns the uint8 images and those into the named arrays of
  `host_outputs` ({name: (per-image shape, dtype)}); `after` maps the batch
  with both to the method's unsmoothed maps, as `maps_fn` does.
  """

  before: Callable[[tuple[Variables, ...], Batch], dict[str, jax.Array]]
  settings: dict[str, Any]
  host_outputs: dict[str, tuple[tuple[int, ...], Any]]
  after: MapsFn


def config_value(config: ml_collections.ConfigDict, key: str) -> Any:
  """The value of dotted `key` ('train.num_steps') in `config`."""
  value = config
  for part in key.split('.'):
    value = value[part]
  return value


def rule_problems(config: ml_collections.ConfigDict, rules: tuple[Rule, ...]) -> list[str]:
  """'config.key = value must be ...' for every rule `config` breaks."""
  problems = []
  for key, valid, expected in rules:
    value = config_value(config, key)
    if not valid(value):
      problems.append(f'config.{key} = {value!r} must be {expected}')
  return problems


class Method(abc.ABC):
  """A method: its networks, objectives, training samples, maps and config rules."""

  name: str
  stages: tuple[int, ...]  # every stage it trains, in training order
  # The config a run of the method starts from, named when a config lacks its keys.
  config_file: str = ''
  config_rules: tuple[Rule, ...] = ()  # checked by config_problems
  # Config keys of the method's own that may change on a trained workdir
  # (beside run_config.PER_RUN_KEYS): settings of how it runs, not of what it learned.
  per_run_keys: tuple[str, ...] = ()
  # Config sections that change the maps or image scores of trained networks
  # (held-out thresholds are recomputed when they change).
  inference_sections: tuple[str, ...] = ()

  def config_problems(self, config: ml_collections.ConfigDict) -> list[str]:
    """Every method-specific config value that is invalid, as 'config.key = v must be ...'."""
    return rule_problems(config, self.config_rules)

  @abc.abstractmethod
  def create_model(self, config: ml_collections.ConfigDict, stage: int) -> nn.Module:
    """The network `stage` trains; float32 parameters whatever the compute dtype."""

  def learning_rate(self, config: ml_collections.ConfigDict, stage: int) -> optax.Schedule:
    """The learning-rate schedule of `stage`'s optimizers, which training also logs.

    By default `train.learning_rate` with the decay of `train`, over the stage's steps.
    """
    return schedules.learning_rate_schedule(config.train, schedules.stage_steps(config, stage))

  def create_state(self, config: ml_collections.ConfigDict, key: jax.Array, stage: int) -> Any:
    """Fresh training state of `stage`: by default its network (`create_model`) with Adam.

    A method that trains several networks in a stage returns their states
    in one pytree whose `params` and `batch_stats` are the variables
    `maps_fn` receives (e.g. `network_state.AdversarialState`).
    """
    model = self.create_model(config, stage)
    return network_state.create(
        model, key, jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32),
        optax.adam(self.learning_rate(config, stage)))

  def train_step(self, config: ml_collections.ConfigDict, stage: int) -> default_step.Step:
    """The pure per-device step of `stage`: by default one update on `objective`."""
    return functools.partial(default_step.train_step, objective=self.objective(config, stage))

  def objective(self, config: ml_collections.ConfigDict, stage: int) -> Objective:
    """The loss of `stage` given the network's prediction and the batch.

    Used by the default `train_step`; a method with its own step need not give one.
    """
    raise NotImplementedError(f'{self.name} trains stage {stage} with its own train_step')

  @abc.abstractmethod
  def sampler_factory(self, config: ml_collections.ConfigDict, stage: int,
                      images: np.ndarray) -> pipeline.SamplerFactory:
    """A picklable factory of the host workers' sampler for `stage`.

    `images` are the normal training images (held-out ones excluded). The
    factory is unpickled in worker processes, so what it references must
    not import JAX.
    """

  def frozen_stages(self, stage: int) -> tuple[int, ...]:
    """Earlier stages whose trained variables `stage_batch` of `stage` reads."""
    del stage
    return ()

  def stage_batch(self, config: ml_collections.ConfigDict, stage: int) -> StageBatchFn | None:
    """Device-side turn of a host batch into `stage`'s batch; None: as it is."""
    del config, stage
    return None

  @abc.abstractmethod
  def map_names(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]
                ) -> tuple[str, ...]:
    """The names of the maps `maps_fn` gives for the trained stages, in report order."""

  def final_map(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]) -> str:
    """Name of the map decisions are made on: the last of `map_names`."""
    return self.map_names(config, trained)[-1]

  @abc.abstractmethod
  def maps_fn(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]) -> MapsFn:
    """The pure per-device anomaly maps of the trained stages (unsmoothed)."""

  def combine(self, config: ml_collections.ConfigDict, maps: dict[str, jax.Array]
              ) -> dict[str, jax.Array]:
    """`maps` with the maps the method derives from other maps (no network) recomputed.

    `maps_fn` ends with it; the evaluation's baseline row runs it on
    constant maps, so a combination that favours some positions shows.
    By default nothing is derived.
    """
    del config
    return maps

  def scores_fn(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]
                ) -> ScoresFn | None:
    """The image scores the method computes itself (None: every map's by `eval.score_rule`)."""
    del config, trained
    return None

  def pure_config(self, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` changed, if need be, so that `maps_fn` needs no `host_inputs`.

    The compiled detector and its export are one pure function of the
    images; a method whose maps read host-computed inputs switches them to
    their device versions here.
    """
    return config

  def host_split(self, config: ml_collections.ConfigDict, trained: tuple[int, ...]
                 ) -> HostSplit | None:
    """The maps in two device parts around a host step; None: the maps need none."""
    del config, trained
    return None

  def host_step(self, settings: dict[str, Any]) -> HostStep:
    """The host step of `host_split` with its `settings` (JSON, as an export stores them)."""
    raise NotImplementedError(f'{self.name} has no host step')

  def host_inputs(self, config: ml_collections.ConfigDict, trained: tuple[int, ...],
                  images: np.ndarray, batch_size: int, num_workers: int
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Host-computed extra inputs of each inference batch of `images` ({} each: none)."""
    del config, trained, num_workers
    for _ in range(0, len(images), batch_size):
      yield {}

  def extra_results(self, config: ml_collections.ConfigDict, test_maps: np.ndarray,
                    test: Any, held_out_maps: np.ndarray | None) -> dict[str, Any]:
    """Method-specific evaluation results beside the metric rows ({}: none).

    Args:
      config: the run's config.
      test_maps: the final map of every test image.
      test: the category's `data.TestSet`.
      held_out_maps: the final maps of the held-out normal images; None when
        nothing is held out.
    """
    del config, test_maps, test, held_out_maps
    return {}
