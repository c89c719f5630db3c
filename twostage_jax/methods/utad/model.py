"""UTAD's networks (Liu et al., "Unsupervised Two-Stage Anomaly Detection", Sec. 3 and 4.1).

- `IENet`, the impression extractor: an encoder E_M of inception blocks
  (GoogLeNet's, with BatchNorm), each followed by 2x2 max-pooling; an MLP
  from the encoder's features to a Gaussian latent code z; the statistics
  network T of the mutual-information bound; a decoder D_M of inception
  blocks, each after a 2x nearest upsampling, and a 1x1 convolution with a
  sigmoid that gives the impression m.
- `ExpertNet`, after MUNIT: content encoders for impressions (E_X^A) and
  images (E_X^B), a detail (style) encoder E_S, and one decoder with AdaIN
  residual blocks whose AdaIN parameters come from the detail code.

The paper's text lost Sec. 3.1's end, Sec. 3.2 and Eqs. 4-7 and gives no
widths. What these modules fix (docs/methods.md, "UTAD", lists the same choices):
- the latent code is spatial: the MLP (three dense layers) maps each
  position of the encoder's output to (mu, log sigma^2) of a code there, so
  the map keeps where things are; the KL term pulls every code towards
  N(0, I). T is a 4-layer MLP on (image patch, code) pairs of one position,
  the patch being the 2^k x 2^k pixels under the code (k poolings), and ends
  in the logit whose sigmoid the paper names (the loss takes log-sigmoids).
- inception branch widths follow GoogLeNet's block 3a for an output width
  w: 1x1 w/4; 1x1 3w/8 then 3x3 w/2; 1x1 w/16 then 5x5 w/8; 3x3 max-pool
  then 1x1 w/8.
- Expert-Net's encoders: a 7x7 convolution, then one 4x4 stride-2
  convolution per further width, instance norm and ReLU after each (MUNIT's
  content encoder), then residual blocks; the detail encoder: 7x7, 4x4/2,
  4x4/2 convolutions and global average pooling (its third convolution
  gives the code). The decoder: residual blocks with AdaIN, then per
  further width a 2x nearest upsampling, a 5x5 convolution, layer norm and
  ReLU (MUNIT's), and a 7x7 convolution with a sigmoid. The AdaIN
  parameters come from the detail code through MUNIT's 3-layer MLP.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from twostage_jax.models import layers
from twostage_jax.runtime.parallel import DATA_AXIS
from twostage_jax.training import precision

ADAIN_EPSILON = 1e-5


def inception_branch_widths(width: int) -> tuple[int, int, int, int, int, int]:
  """(1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool projection) of a block of output `width`.

  GoogLeNet's block 3a (64, 96, 128, 16, 32, 32 for 256) scaled to `width`;
  the four outputs add up to `width`.
  """
  one, three, five = width // 4, width // 2, width // 8
  return one, 3 * width // 8, three, max(width // 16, 1), five, width - one - three - five


def nearest_upsample_2x(x: jax.Array) -> jax.Array:
  """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated 2x2."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def space_to_depth(images: jax.Array, block: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/block, W/block, block * block * C): each block's pixels as a vector."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // block, block, w // block, block, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // block, w // block, block * block * c)


def adaptive_instance_norm(x: jax.Array, scale: jax.Array, bias: jax.Array,
                           epsilon: float = ADAIN_EPSILON) -> jax.Array:
  """AdaIN (Huang & Belongie 2017): each channel of each image normalised, then scale * x + bias.

  Args:
    x: (B, H, W, C) features.
    scale, bias: (B, C), per image (from its detail code).
    epsilon: added to the variance.
  """
  x = precision.widen(x)
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  variance = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
  normalised = (x - mean) * jax.lax.rsqrt(variance + epsilon)
  return normalised * scale[:, None, None, :] + bias[:, None, None, :]


class InceptionBlock(nn.Module):
  """GoogLeNet's inception block with BatchNorm and ReLU after every convolution."""

  width: int
  bn_momentum: float
  bn_epsilon: float
  axis_name: str | None = DATA_AXIS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = layers.batch_norm(train, self.bn_momentum, self.bn_epsilon, self.axis_name, self.dtype)

    def conv(inputs, features, kernel):
      y = layers.conv(features, (kernel, kernel), self.dtype, use_bias=False)(inputs)
      return nn.relu(norm()(y))

    one, reduce3, three, reduce5, five, pool = inception_branch_widths(self.width)
    pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding='SAME')
    return jnp.concatenate([
        conv(x, one, 1),
        conv(conv(x, reduce3, 1), three, 3),
        conv(conv(x, reduce5, 1), five, 5),
        conv(pooled, pool, 1),
    ], axis=-1)


class IENet(nn.Module):
  """The impression extractor: image -> latent code -> anomaly-free impression m.

  Attributes:
    encoder_widths: output widths of E_M's inception blocks (each then pooled).
    decoder_widths: output widths of D_M's inception blocks (each after an upsampling).
    latent_dim: channels of the code z at each position.
    mlp_width: width of the MLP's two hidden layers.
    statistics_width: width of T's three hidden layers.
    bn_momentum, bn_epsilon: BatchNorm's.
    axis_name: mapped axis over which batch statistics are averaged while training.
    dtype: compute dtype; parameters are float32, codes and the impression at least float32.
  """

  encoder_widths: tuple[int, ...]
  decoder_widths: tuple[int, ...]
  latent_dim: int
  mlp_width: int
  statistics_width: int
  bn_momentum: float
  bn_epsilon: float
  axis_name: str | None = DATA_AXIS
  dtype: jnp.dtype = jnp.float32

  @property
  def patch_size(self) -> int:
    """Pixels per side of the image patch under one latent position."""
    return 2 ** len(self.encoder_widths)

  def setup(self):
    block = functools.partial(InceptionBlock, bn_momentum=self.bn_momentum,
                              bn_epsilon=self.bn_epsilon, axis_name=self.axis_name,
                              dtype=self.dtype)
    self.encoder = [block(width) for width in self.encoder_widths]
    # The MLP and T compute in at least float32 (their inputs are widened).
    self.mlp = [nn.Dense(self.mlp_width), nn.Dense(self.mlp_width), nn.Dense(2 * self.latent_dim)]
    self.statistics_layers = [nn.Dense(self.statistics_width) for _ in range(3)] + [nn.Dense(1)]
    self.decoder = [block(width) for width in self.decoder_widths]
    self.to_image = nn.Conv(3, (1, 1), dtype=precision.widened(self.dtype),
                            param_dtype=jnp.float32)

  def encode(self, images: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    """(mu, log sigma^2) of the code at each position, each (B, H/2^k, W/2^k, latent_dim)."""
    x = images.astype(self.dtype)
    for block in self.encoder:
      x = layers.max_pool_2x2(block(x, train))
    x = precision.widen(x)
    for layer in self.mlp[:-1]:
      x = nn.relu(layer(x))
    mean, log_variance = jnp.split(self.mlp[-1](x), 2, axis=-1)
    return mean, log_variance

  def decode(self, codes: jax.Array, train: bool) -> jax.Array:
    """The impression m (B, H, W, 3) in [0, 1] of codes (B, H/2^k, W/2^k, latent_dim)."""
    x = codes.astype(self.dtype)
    for block in self.decoder:
      x = block(nearest_upsample_2x(x), train)
    return nn.sigmoid(self.to_image(precision.widen(x)))

  def statistics(self, images: jax.Array, codes: jax.Array) -> jax.Array:
    """T's logits (B, H/2^k, W/2^k) of (image patch, code) pairs at each position."""
    x = jnp.concatenate([space_to_depth(precision.widen(images), self.patch_size),
                         precision.widen(codes)], axis=-1)
    for layer in self.statistics_layers[:-1]:
      x = nn.relu(layer(x))
    return self.statistics_layers[-1](x)[..., 0]

  def __call__(self, images: jax.Array, train: bool, noise: jax.Array | None = None
               ) -> dict[str, jax.Array]:
    """The impression and the code of `images` (B, H, W, 3) in [0, 1].

    `noise` (N(0, 1), shaped like the code) samples z = mu + sigma * noise;
    None takes z = mu, as inference does.

    Returns:
      'impression' (B, H, W, 3), 'mean', 'log_variance', 'code' and
      'joint_logits' (T of each position's patch with its own code).
    """
    mean, log_variance = self.encode(images, train)
    code = mean if noise is None else mean + jnp.exp(0.5 * log_variance) * noise
    return {'impression': self.decode(code, train), 'mean': mean,
            'log_variance': log_variance, 'code': code,
            'joint_logits': self.statistics(images, code)}


class _ReflectConv(nn.Module):
  """MUNIT's convolution: reflect padding by (kernel - 1) // 2 keeps borders from reading as edges."""

  features: int
  kernel: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = (self.kernel - 1) // 2
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode='reflect')
    return nn.Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride),
                   padding='VALID', dtype=self.dtype, param_dtype=jnp.float32)(x)


def _instance_norm(x: jax.Array) -> jax.Array:
  """Each channel of each image to zero mean and unit variance (no affine, as MUNIT's)."""
  per_channel = (x.shape[0], x.shape[-1])
  return adaptive_instance_norm(x, jnp.ones(per_channel), jnp.zeros(per_channel))


class ContentEncoder(nn.Module):
  """E_X^A or E_X^B: conv blocks (7x7, then 4x4 stride 2 per further width), residual blocks."""

  widths: tuple[int, ...]
  residual_blocks: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    for i, width in enumerate(self.widths):
      conv = _ReflectConv(width, 7, dtype=self.dtype) if i == 0 else _ReflectConv(width, 4, 2, dtype=self.dtype)
      x = nn.relu(_instance_norm(conv(x))).astype(self.dtype)
    for _ in range(self.residual_blocks):
      y = nn.relu(_instance_norm(_ReflectConv(self.widths[-1], 3, dtype=self.dtype)(x)))
      y = _instance_norm(_ReflectConv(self.widths[-1], 3, dtype=self.dtype)(y.astype(self.dtype)))
      x = (x + y).astype(self.dtype)
    return x


class DetailEncoder(nn.Module):
  """E_S: three convolutions (7x7, 4x4/2, 4x4/2) and global average pooling -> (B, code_dim)."""

  widths: tuple[int, int]
  code_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = nn.relu(_ReflectConv(self.widths[0], 7, dtype=self.dtype)(images.astype(self.dtype)))
    x = nn.relu(_ReflectConv(self.widths[1], 4, 2, dtype=self.dtype)(x))
    x = _ReflectConv(self.code_dim, 4, 2, dtype=self.dtype)(x)
    return jnp.mean(precision.widen(x), axis=(1, 2))


class AdaINDecoder(nn.Module):
  """Content features and a detail code -> image (B, H, W, 3) in [0, 1].

  Residual blocks normalise with AdaIN, whose (scale, bias) per channel come
  from the detail code through a 3-layer MLP; then per width of
  `upsample_widths` a 2x nearest upsampling, a 5x5 convolution, layer norm
  and ReLU; then a 7x7 convolution and a sigmoid.
  """

  upsample_widths: tuple[int, ...]
  residual_blocks: int
  mlp_width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, content: jax.Array, code: jax.Array) -> jax.Array:
    width = content.shape[-1]
    count = 2 * self.residual_blocks  # two AdaIN layers per block
    x = precision.widen(code)
    for _ in range(2):
      x = nn.relu(nn.Dense(self.mlp_width)(x))
    adain = nn.Dense(2 * count * width)(x).reshape(code.shape[0], count, 2, width)
    x = content
    for i in range(self.residual_blocks):
      y = _ReflectConv(width, 3, dtype=self.dtype)(x)
      y = nn.relu(adaptive_instance_norm(y, 1.0 + adain[:, 2 * i, 0], adain[:, 2 * i, 1]))
      y = _ReflectConv(width, 3, dtype=self.dtype)(y.astype(self.dtype))
      y = adaptive_instance_norm(y, 1.0 + adain[:, 2 * i + 1, 0], adain[:, 2 * i + 1, 1])
      x = (x + y).astype(self.dtype)
    for features in self.upsample_widths:
      y = precision.widen(_ReflectConv(features, 5, dtype=self.dtype)(nearest_upsample_2x(x)))
      y = nn.LayerNorm(reduction_axes=(1, 2, 3), feature_axes=-1)(y)
      x = nn.relu(y).astype(self.dtype)
    return nn.sigmoid(precision.widen(_ReflectConv(3, 7, dtype=self.dtype)(x)))


class ExpertNet(nn.Module):
  """Expert-Net: the high-fidelity reconstruction x_hat of the impression, and the naive one.

  x_hat = G(E_X^A(m), E_S(x)): the impression's content with the image's
  details; m_hat = G(E_X^B(x), E_S(m)): the image's content with the
  impression's details (the naive impression, which keeps anomalies);
  s_hat = E_S(x_hat), tied to s = E_S(x).

  Attributes:
    encoder_widths: widths of the content encoders' convolution blocks (the
      first at full size, each further one halving it).
    residual_blocks: residual blocks of each content encoder and of the decoder.
    detail_widths: widths of E_S's first two convolutions.
    detail_dim: size of the detail code s.
    mlp_width: hidden width of the MLP from s to the AdaIN parameters.
    dtype: compute dtype.
  """

  encoder_widths: tuple[int, ...]
  residual_blocks: int
  detail_widths: tuple[int, int]
  detail_dim: int
  mlp_width: int
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    encoder = functools.partial(ContentEncoder, widths=tuple(self.encoder_widths),
                                residual_blocks=self.residual_blocks, dtype=self.dtype)
    self.impression_encoder = encoder()  # E_X^A
    self.image_encoder = encoder()  # E_X^B
    self.detail_encoder = DetailEncoder(widths=tuple(self.detail_widths), code_dim=self.detail_dim,
                                        dtype=self.dtype)
    # One upsampling per halving of the encoders, back through their widths.
    self.decoder = AdaINDecoder(tuple(reversed(self.encoder_widths[:-1])), self.residual_blocks,
                                self.mlp_width, self.dtype)

  def __call__(self, images: jax.Array, impressions: jax.Array, train: bool = False
               ) -> dict[str, Any]:
    """'reconstruction' x_hat, 'naive_impression' m_hat, 'detail' s and 'detail_of_reconstruction'."""
    del train  # no BatchNorm or dropout
    detail = self.detail_encoder(images)
    reconstruction = self.decoder(self.impression_encoder(impressions), detail)
    naive = self.decoder(self.image_encoder(images), self.detail_encoder(impressions))
    return {'reconstruction': reconstruction, 'naive_impression': naive, 'detail': detail,
            'detail_of_reconstruction': self.detail_encoder(reconstruction)}
