"""The pure, per-device training step of a single network, the default of every method."""

from typing import Any, Callable

import jax

from twostage_jax.training import network_state

Batch = dict[str, jax.Array]
# (prediction, batch) -> (scalar loss, metrics of this device's share).
Objective = Callable[[jax.Array, Batch], tuple[jax.Array, dict[str, jax.Array]]]
# (state, this device's share of the batch, PRNG key) -> (state, metrics).
Step = Callable[[Any, Batch, jax.Array], tuple[Any, dict[str, jax.Array]]]


def train_step(state: network_state.TrainState, batch: Batch, key: jax.Array,
               objective: Objective) -> tuple[network_state.TrainState, dict[str, jax.Array]]:
  """One optimisation step of the network on this device's share of the batch.

  `key` is this step's PRNG key; the two-stage and Bauer networks have no
  stochastic layers, so they do not draw from it.
  """
  del key

  def loss_fn(params):
    prediction, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats},
        batch['image'], train=True, mutable=['batch_stats'])
    loss, metrics = objective(prediction, batch)
    return loss, (metrics, updates['batch_stats'])

  return network_state.update(state, loss_fn)
