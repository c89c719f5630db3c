"""A network's trainable state, a generator-discriminator pair of them, one update of either.

`TrainState` holds one network's parameters, BatchNorm statistics and
optimizer state. `AdversarialState` pairs a generator's and a
discriminator's, each with its own optimizer, so that a step can update one
without touching the other. `update` is the data-parallel optimisation step
of one network every method's step is built from.
"""

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import optax
from flax.training import train_state

from twostage_jax.runtime.parallel import DATA_AXIS

Variables = dict[str, Any]
# params -> (scalar loss, (metrics, updated batch statistics)), on one device's share.
LossFn = Callable[[Any], tuple[jax.Array, tuple[dict[str, jax.Array], Any]]]


class TrainState(train_state.TrainState):
  batch_stats: Any


class AdversarialState(flax.struct.PyTreeNode):
  """A generator and a discriminator, trained in turn; no discriminator: the generator alone.

  `params` and `batch_stats` nest both networks' under 'generator' and
  'discriminator', which is what inference receives as the stage's variables.
  """

  generator: TrainState
  discriminator: TrainState | None

  @property
  def step(self) -> jax.Array:
    return self.generator.step

  @property
  def params(self) -> dict[str, Any]:
    return {'generator': self.generator.params,
            'discriminator': None if self.discriminator is None else self.discriminator.params}

  @property
  def batch_stats(self) -> dict[str, Any]:
    return {'generator': self.generator.batch_stats,
            'discriminator': (None if self.discriminator is None
                              else self.discriminator.batch_stats)}


def create(model: nn.Module, key: jax.Array, inputs: jax.Array | tuple[jax.Array, ...],
           tx: optax.GradientTransformation) -> TrainState:
  """Fresh variables of `model` for inputs shaped like `inputs`, and `tx`'s state.

  A tuple of `inputs` are the model's positional inputs; a model without
  BatchNorm gets empty `batch_stats`.
  """
  inputs = inputs if isinstance(inputs, tuple) else (inputs,)
  # Jitted: run op by op, init would compile every layer's ops separately.
  variables = jax.jit(lambda k, x: model.init(k, *x, train=False))(key, inputs)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx)


def update(state: TrainState, loss_fn: LossFn) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step of `state` on the gradient of `loss_fn`, averaged over the devices.

  Written per device in the pmap style: gradients and metrics are averaged
  over the `data` axis (BatchNorm averages its batch statistics itself), so
  every device ends the step with the same state.
  """
  grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
  return apply_mean_gradients(state, grads, batch_stats), jax.lax.pmean(metrics, DATA_AXIS)


def apply_mean_gradients(state: TrainState, grads: Any, batch_stats: Any) -> TrainState:
  """`state` after one optimizer step on this device's `grads` averaged over the devices."""
  return state.apply_gradients(grads=jax.lax.pmean(grads, DATA_AXIS), batch_stats=batch_stats)
