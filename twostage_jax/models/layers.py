"""Layers both networks build from: BatchNorm as PyTorch computes it, conv-BN-ReLU.

Call these inside a parent's `nn.compact` method: the submodules they create
belong to, and are named in, that parent.
"""

import functools
from typing import Callable

import flax.linen as nn
import jax


def batch_norm(train: bool, momentum: float, epsilon: float,
               axis_name: str | None) -> Callable[[], nn.BatchNorm]:
  """A factory of BatchNorm layers for a forward pass in `train` mode.

  Statistics are averaged over `axis_name` while training, so every device
  normalises with the batch's statistics, and computed with the two-pass
  variance: the one-pass E[x^2] - E[x]^2 cancels catastrophically in float32.
  """
  return functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=momentum,
      epsilon=epsilon,
      axis_name=axis_name if train else None,
      use_fast_variance=False,
  )


def conv_bn_relu(x: jax.Array, features: int, norm: Callable[[], nn.BatchNorm]) -> jax.Array:
  """3x3 'same' convolution without bias (BatchNorm removes it), BatchNorm, ReLU."""
  x = nn.Conv(features, (3, 3), padding='SAME', use_bias=False)(x)
  return nn.relu(norm()(x))
