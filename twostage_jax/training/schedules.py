"""How long each stage trains and its learning rate over those steps."""

import ml_collections
import optax


def stage_steps(config: ml_collections.ConfigDict, stage: int) -> int:
  """Training steps of `stage`: `stage<n>.num_steps` where the config sets it, else `train.num_steps`."""
  section = config.get(f'stage{stage}')
  if section is not None and section.get('num_steps') is not None:
    return section.num_steps
  return config.train.num_steps


def learning_rate_schedule(train_config: ml_collections.ConfigDict, num_steps: int,
                           learning_rate: float | None = None) -> optax.Schedule:
  """Constant rate, multiplied by `lr_decay_factor` at each decay fraction of `num_steps`.

  The rate is `learning_rate`, or `train_config.learning_rate` when None (a
  method's network with a rate of its own passes it).
  """
  return optax.piecewise_constant_schedule(
      train_config.learning_rate if learning_rate is None else learning_rate,
      {int(f * num_steps): train_config.lr_decay_factor for f in train_config.lr_decay_fractions})
