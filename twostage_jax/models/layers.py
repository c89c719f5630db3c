"""Layers both networks build from: BatchNorm as PyTorch computes it, conv-BN-ReLU.

Call the module-creating functions inside a parent's `nn.compact` method: the
submodules they create belong to, and are named in, that parent.

Mixed precision: `dtype` is the compute dtype. Parameters stay float32
(`param_dtype`), so the optimizer updates float32 weights; BatchNorm always
reduces its statistics in at least float32 and keeps float32 running averages.

`max_pool_2x2` and `upsample_bilinear_2x` compute what `nn.max_pool` and
`jax.image.resize` compute, in a form whose gradient XLA runs faster
(benchmarks/train_step.py --breakdown times the forward and backward pass).
"""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]
INITS = ('lecun', 'normal')  # model.init


def initializers(init: str, std: float | None) -> tuple[Initializer, Initializer]:
  """The convolution kernels' and BatchNorm scales' initializers of `init`.

  'lecun': Flax's defaults (LeCun normal kernels, scales 1). 'normal':
  DRAEM's and the two-stage public code's, kernels N(0, std^2) and scales
  N(1, std^2) (their std is 0.02). Biases and BatchNorm offsets start at 0.
  """
  if init == 'lecun':
    return nn.initializers.lecun_normal(), nn.initializers.ones
  if init == 'normal':
    if std is None or std <= 0:
      raise ValueError(f"model.init 'normal' needs a positive init_std; got {std}")
    normal = nn.initializers.normal(std)
    return normal, lambda key, shape, dtype=jnp.float32: 1 + normal(key, shape, dtype)
  raise ValueError(f'model.init {init!r} is none of {INITS}')


def batch_norm(train: bool, momentum: float, epsilon: float,
               axis_name: str | None,
               dtype: jnp.dtype = jnp.float32,
               scale_init: Initializer = nn.initializers.ones) -> Callable[[], nn.BatchNorm]:
  """A factory of BatchNorm layers for a forward pass in `train` mode.

  Statistics are averaged over `axis_name` while training, so every device
  normalises with the batch's statistics, and computed with the two-pass
  variance: the one-pass E[x^2] - E[x]^2 cancels catastrophically in float32.
  The normalised output is returned in `dtype`.
  """
  return functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=momentum,
      epsilon=epsilon,
      axis_name=axis_name if train else None,
      use_fast_variance=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=scale_init,
  )


def conv(features: int, kernel: tuple[int, int], dtype: jnp.dtype, **kwargs) -> nn.Conv:
  """A 'same' convolution computing in `dtype` with float32 parameters."""
  return nn.Conv(features, kernel, padding='SAME', dtype=dtype, param_dtype=jnp.float32,
                 **kwargs)


def conv_bn_relu(x: jax.Array, features: int, norm: Callable[[], nn.BatchNorm],
                 dtype: jnp.dtype = jnp.float32,
                 kernel_init: Initializer = nn.initializers.lecun_normal()) -> jax.Array:
  """3x3 'same' convolution without bias (BatchNorm removes it), BatchNorm, ReLU."""
  x = conv(features, (3, 3), dtype, use_bias=False, kernel_init=kernel_init)(x)
  return nn.relu(norm()(x))


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` of (B, H, W, C) with even H and W.

  A reshape and a max: its gradient is elementwise, where XLA:CPU runs the
  gradient of a pooling window (select-and-scatter) 3x slower. Where a
  window holds several equal maxima the gradient is split between them
  instead of going to the first; after a ReLU such ties are zeros, whose
  gradient the ReLU stops either way.
  """
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _upsample_axis(x: jax.Array, axis: int) -> jax.Array:
  n = x.shape[axis]
  before = jnp.concatenate(
      [lax.slice_in_dim(x, 0, 1, axis=axis), lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis)
  after = jnp.concatenate(
      [lax.slice_in_dim(x, 1, n, axis=axis), lax.slice_in_dim(x, n - 1, n, axis=axis)], axis)
  # Output pixel 2i sits a quarter pixel before input pixel i, 2i + 1 a
  # quarter pixel after it; the edges repeat the border pixel.
  even = 0.75 * x + 0.25 * before
  odd = 0.75 * x + 0.25 * after
  shape = x.shape[:axis] + (2 * n,) + x.shape[axis + 1:]
  return jnp.stack([even, odd], axis=axis + 1).reshape(shape)


def upsample_bilinear_2x(x: jax.Array) -> jax.Array:
  """`jax.image.resize(x, (B, 2H, 2W, C), 'bilinear')` of (B, H, W, C).

  Bilinear interpolation with half-pixel centres at scale 2 has the fixed
  weights 1/4 and 3/4 on two neighbours; written with slices, it and its
  gradient are elementwise, where `jax.image.resize` multiplies by dense
  (2H, H) and (2W, W) interpolation matrices.
  """
  return _upsample_axis(_upsample_axis(x, 1), 2)
