"""Bauer's convolutional autoencoder for self-supervised anomaly detection.

Bauer, Nakajima and Mueller, "Self-Supervised Training with Autoencoders for
Visual Anomaly Detection" (2022), the architecture of its Table 1: a
max-pooling encoder, a bottleneck of stacked dilated convolution (SDC) blocks
and a decoder that mirrors the encoder at twice its widths. With encoder
widths (32, 64, 128): conv 3x3 256; then per level, from the deepest, a 3x3
stride-2 transposed convolution and a 3x3 convolution of 256, 128 or 64
channels (twice the level's encoder width) and a 3x3 convolution of 128, 64
or 32 (its encoder width); a 1x1 convolution to 3 channels with a sigmoid.
Every convolution but the last is followed by BatchNorm and ReLU. The SDC blocks see a large context at the coarsest
scale without further downsampling, so the network can replace a modified
patch with what its surroundings predict. No skip connections: they would let
anomalous texture pass straight to the output.

The internal order of an SDC block (parallel dilated convolutions,
concatenation, BatchNorm, ReLU; no 1x1 reduction) follows the project's
design brief; the paper's text available to us does not spell it out.
"""

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from twostage_jax.models import layers
from twostage_jax.runtime.parallel import DATA_AXIS
from twostage_jax.training import precision


class BauerAutoencoder(nn.Module):
  """Maps an image (B, H, W, 3) to its reconstruction (B, H, W, 3) in [0, 1].

  Attributes:
    encoder_widths: channels of the encoder blocks, each followed by a 2x2
      max-pool; the decoder mirrors them.
    sdc_blocks: number of stacked dilated convolution blocks at the bottleneck.
    sdc_filters: filters of each dilated convolution in a block.
    sdc_dilations: dilation rates of a block's parallel convolutions; a block
      outputs len(sdc_dilations) * sdc_filters channels.
    sdc_kernel: spatial size of the dilated convolutions.
    bn_momentum: decay of the BatchNorm running statistics.
    bn_epsilon: BatchNorm variance epsilon.
    axis_name: mapped axis over which batch statistics are averaged while
      training (None when the network runs outside a mapped context).
    dtype: compute dtype of the layers (bfloat16 for mixed precision);
      parameters are float32, the last layer and the returned
      reconstruction at least float32.
  """

  encoder_widths: Sequence[int]
  sdc_blocks: int
  sdc_filters: int
  sdc_dilations: Sequence[int]
  sdc_kernel: int
  bn_momentum: float
  bn_epsilon: float
  axis_name: str | None = DATA_AXIS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    multiple = 2 ** len(self.encoder_widths)
    if x.shape[-3] % multiple or x.shape[-2] % multiple:
      raise ValueError(
          f'image height and width must be multiples of {multiple} '
          f'({len(self.encoder_widths)} 2x2 poolings and upsamplings); '
          f'got {x.shape[-3]}x{x.shape[-2]}')
    norm = layers.batch_norm(train, self.bn_momentum, self.bn_epsilon, self.axis_name,
                             self.dtype)
    conv_bn_relu = functools.partial(layers.conv_bn_relu, norm=norm, dtype=self.dtype)

    for features in self.encoder_widths:
      x = conv_bn_relu(x, features)
      x = conv_bn_relu(x, features)
      x = layers.max_pool_2x2(x)

    kernel = (self.sdc_kernel, self.sdc_kernel)
    for _ in range(self.sdc_blocks):
      x = jnp.concatenate([
          layers.conv(self.sdc_filters, kernel, self.dtype,
                      kernel_dilation=(rate, rate), use_bias=False)(x)
          for rate in self.sdc_dilations
      ], axis=-1)
      x = nn.relu(norm()(x))

    x = conv_bn_relu(x, 2 * self.encoder_widths[-1])
    for features in reversed(self.encoder_widths):
      x = nn.ConvTranspose(2 * features, (3, 3), strides=(2, 2), padding='SAME',
                           use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)(x)
      x = nn.relu(norm()(x))
      x = conv_bn_relu(x, 2 * features)
      x = conv_bn_relu(x, features)
    out = precision.widened(self.dtype)
    x = layers.conv(3, (1, 1), out)(x.astype(out))
    return nn.sigmoid(x)
