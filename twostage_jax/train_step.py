"""The pure, per-device training step every method shares."""

import jax

from twostage_jax.methods.base import Objective
from twostage_jax.models.segmentation import DATA_AXIS
from twostage_jax.train_state import TrainState


def train_step(state: TrainState, batch: dict[str, jax.Array], key: jax.Array,
               objective: Objective) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimisation step on this device's share of the batch.

  Written per device in the pmap style: gradients, metrics and (inside
  BatchNorm) batch statistics are averaged over the `data` axis, so every
  device ends the step with the same state. `key` is this step's PRNG key;
  the two-stage and Bauer networks have no stochastic layers, so they do not
  draw from it.
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
