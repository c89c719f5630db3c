"""The per-stage segmentation network of the two-stage coarse-to-fine model.

An encoder-decoder without skip connections (docs/methods.md, "Segmentation
network"): the missing skips keep the network from copying input texture into
the map, so it has to recognise the anomaly. Width 128 gives 11,955,969
parameters (BatchNorm scale/bias included, running statistics excluded).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from twostage_jax.models import layers
from twostage_jax.runtime.parallel import DATA_AXIS
from twostage_jax.training import precision



class SegmentationNet(nn.Module):
  """Maps an image (B, H, W, C) to a one-channel anomaly map (B, H, W).

  Attributes:
    width: channels of the first block; later blocks use 2x and 4x.
    bn_momentum: decay of the BatchNorm running statistics.
    bn_epsilon: BatchNorm variance epsilon.
    axis_name: mapped axis over which batch statistics are averaged while
      training (None when the network runs outside a mapped context).
    dtype: compute dtype of the layers (bfloat16 for mixed precision);
      parameters are float32, the last layer and the returned map at least
      float32 (`precision.widened`).
    weight_init: initialisation of kernels and BatchNorm scales
      (layers.initializers; model.init).
    weight_init_std: the standard deviation of 'normal' (model.init_std).
  """

  width: int
  bn_momentum: float
  bn_epsilon: float
  axis_name: str | None = DATA_AXIS
  dtype: jnp.dtype = jnp.float32
  weight_init: str = 'lecun'
  weight_init_std: float | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if x.shape[-3] % 4 or x.shape[-2] % 4:
      raise ValueError(
          f'image height and width must be multiples of 4 (two 2x2 poolings '
          f'and upsamplings); got {x.shape[-3]}x{x.shape[-2]}')
    kernel_init, scale_init = layers.initializers(self.weight_init, self.weight_init_std)
    norm = layers.batch_norm(train, self.bn_momentum, self.bn_epsilon, self.axis_name,
                             self.dtype, scale_init)
    conv_bn_relu = functools.partial(layers.conv_bn_relu, norm=norm, dtype=self.dtype,
                                     kernel_init=kernel_init)

    w = self.width
    for i, features in enumerate((w, 2 * w, 4 * w)):
      x = conv_bn_relu(x, features)
      x = conv_bn_relu(x, features)
      if i < 2:
        x = layers.max_pool_2x2(x)
    x = layers.upsample_bilinear_2x(x)
    for features in (4 * w, 4 * w, 2 * w):
      x = conv_bn_relu(x, features)
    x = layers.upsample_bilinear_2x(x)
    for features in (2 * w, 2 * w, w):
      x = conv_bn_relu(x, features)
    # The last layer computes in at least float32 whatever `dtype`: bfloat16
    # keeps 8 significant bits, which would tie millions of pooled pixels of the map.
    out = precision.widened(self.dtype)
    x = layers.conv(1, (3, 3), out, kernel_init=kernel_init)(x.astype(out))
    return x[..., 0]
