"""AnoSeg's networks (Song et al., ICLR 2022 submission, Table 6 of its appendix).

- `AnoSegNet`: a ResNet-18 encoder (its convolution layers, trained from
  scratch) and up to two decoders of the same layout, one for the
  reconstructed image (3 channels) and one for the map (1 channel). The
  anomaly detector of Sec. 3.4 is the same network without the map decoder,
  fed the image concatenated with AnoSeg's map.
- `Discriminator`: strided 4x4 convolutions down to 2x2 (its features, f of
  Eq. 5), then a 4x4 convolution to one logit.

The table leaves open what these modules fix as follows (the parameter-count
test states the same assumptions):
- input channels: the image (3; 4 with the detector's map) plus the two
  coordinate channels when `coordinate_channels` is on; the discriminator
  sees concat(image, mask) only, without coordinate channels;
- biases: none in a convolution followed by BatchNorm (BatchNorm's shift
  replaces it), as in ResNet; the layers without BatchNorm (each network's
  last layer, the discriminator's first) have one;
- the LeakyReLU slope is a config value (DCGAN's 0.2 in the configs);
- outputs are in the paper's convention: the map is 1 on *normal* pixels.
  The method plug-in turns it into an anomaly map.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from twostage_jax.models import layers
from twostage_jax.runtime.parallel import DATA_AXIS
from twostage_jax.training import precision

RESNET18_BLOCKS = 2  # basic blocks per stage of ResNet-18
ENCODER_STRIDE = 32  # the stem's convolution and max-pool, then three strided stages


def coordinate_channels(batch: int, height: int, width: int) -> jax.Array:
  """(batch, height, width, 2) rank-1 coordinate maps in [-1, 1]: x (column), then y (row)."""
  x = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, width)[None, :], (height, width))
  y = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, height)[:, None], (height, width))
  return jnp.broadcast_to(jnp.stack([x, y], axis=-1), (batch, height, width, 2))


def _conv(features: int, kernel: int, stride: int, padding: int, dtype: jnp.dtype,
          use_bias: bool = False) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                 dtype=dtype, param_dtype=jnp.float32)


class ResNet18Encoder(nn.Module):
  """The convolution layers of ResNet-18 (He et al. 2016): (B, H, W, C) -> (B, H/32, W/32, 512)."""

  widths: tuple[int, ...]
  bn_momentum: float
  bn_epsilon: float
  axis_name: str | None = DATA_AXIS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = layers.batch_norm(train, self.bn_momentum, self.bn_epsilon, self.axis_name,
                             self.dtype)
    x = nn.relu(norm()(_conv(self.widths[0], 7, 2, 3, self.dtype)(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, features in enumerate(self.widths):
      for block in range(RESNET18_BLOCKS):
        stride = 2 if stage > 0 and block == 0 else 1
        shortcut = x
        if stride != 1 or x.shape[-1] != features:
          shortcut = norm()(_conv(features, 1, stride, 0, self.dtype)(x))
        y = nn.relu(norm()(_conv(features, 3, stride, 1, self.dtype)(x)))
        y = norm()(_conv(features, 3, 1, 1, self.dtype)(y))
        x = nn.relu(y + shortcut)
    return x


class UpDecoder(nn.Module):
  """Table 6's decoder: conv, then per upsampling a 4x4 stride-2 transposed conv and a conv.

  `widths[0]` is the first convolution's width; each later entry is the
  width of the convolution after one upsampling (the transposed convolution
  keeps the width it receives). The last layer is a 3x3 convolution to
  `out_channels` with a sigmoid, computed in at least float32.
  """

  widths: tuple[int, ...]
  out_channels: int
  bn_momentum: float
  bn_epsilon: float
  axis_name: str | None = DATA_AXIS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = layers.batch_norm(train, self.bn_momentum, self.bn_epsilon, self.axis_name,
                             self.dtype)
    x = nn.relu(norm()(_conv(self.widths[0], 3, 1, 1, self.dtype)(x)))
    for features in self.widths[1:]:
      # PyTorch's ConvTranspose2d(k=4, s=2, p=1) doubles the size; it pads the
      # dilated input by k - 1 - p = 2 on each side.
      x = nn.ConvTranspose(x.shape[-1], (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)),
                           use_bias=False, dtype=self.dtype, param_dtype=jnp.float32)(x)
      x = nn.relu(norm()(x))
      x = nn.relu(norm()(_conv(features, 3, 1, 1, self.dtype)(x)))
    out = precision.widened(self.dtype)
    x = _conv(self.out_channels, 3, 1, 1, out, use_bias=True)(x.astype(out))
    return nn.sigmoid(x)


class AnoSegNet(nn.Module):
  """Encoder and decoders: (B, H, W, C) -> {'map': (B, H, W), 'image': (B, H, W, 3)}.

  Attributes:
    encoder_widths: ResNet-18's stage widths (64, 128, 256, 512).
    decoder_widths: see UpDecoder; Table 6: (512, 256, 128, 128, 128, 128).
    map_decoder: whether to output the map (AnoSeg) or not (its detector).
    image_decoder: whether to output the reconstructed image (off in the
      ablation's base model, which generates the map only).
    coordinate_channels: concatenate the x and y coordinate channels to the input.
    image_decoder_trains_encoder: False stops the image decoder's gradient at
      the shared encoder (a departure from the paper, for issue 29's test of
      what the reconstruction does to the map).
  """

  encoder_widths: tuple[int, ...]
  decoder_widths: tuple[int, ...]
  map_decoder: bool
  image_decoder: bool
  coordinate_channels: bool
  image_decoder_trains_encoder: bool
  bn_momentum: float
  bn_epsilon: float
  axis_name: str | None = DATA_AXIS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[str, jax.Array]:
    batch, height, width, _ = x.shape
    if height % ENCODER_STRIDE or width % ENCODER_STRIDE:
      raise ValueError(f'image height and width must be multiples of {ENCODER_STRIDE} '
                       f'(the encoder halves them 5 times); got {height}x{width}')
    if self.coordinate_channels:
      x = jnp.concatenate([x, coordinate_channels(batch, height, width).astype(x.dtype)], -1)
    common = dict(bn_momentum=self.bn_momentum, bn_epsilon=self.bn_epsilon,
                  axis_name=self.axis_name, dtype=self.dtype)
    code = ResNet18Encoder(self.encoder_widths, name='encoder', **common)(
        x.astype(self.dtype), train)
    decoder = functools.partial(UpDecoder, self.decoder_widths, **common)
    out = {}
    if self.map_decoder:
      out['map'] = decoder(1, name='map_decoder')(code, train)[..., 0]
    if self.image_decoder:
      image_code = code if self.image_decoder_trains_encoder else jax.lax.stop_gradient(code)
      out['image'] = decoder(3, name='image_decoder')(image_code, train)
    return out


class Discriminator(nn.Module):
  """(B, H, W, C) -> (logits (B,), features (B, F)) with H = W = 2^(len(widths) + 1).

  Each width is one 4x4 stride-2 convolution (the first without BatchNorm),
  LeakyReLU; the features are the last of them flattened (Table 6's Conv 7,
  2x2x128, the second-to-last layer); a last 4x4 stride-2 convolution gives
  the logit (the table's sigmoid is applied by the loss).
  """

  widths: tuple[int, ...]
  leaky_slope: float
  bn_momentum: float
  bn_epsilon: float
  axis_name: str | None = DATA_AXIS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
    size = 2 ** (len(self.widths) + 1)
    if x.shape[1:3] != (size, size):
      raise ValueError(f'a discriminator of {len(self.widths)} widths takes {size}x{size} '
                       f'inputs; got {x.shape[1]}x{x.shape[2]}')
    norm = layers.batch_norm(train, self.bn_momentum, self.bn_epsilon, self.axis_name,
                             self.dtype)
    x = x.astype(self.dtype)
    for index, features in enumerate(self.widths):
      x = _conv(features, 4, 2, 1, self.dtype, use_bias=index == 0)(x)
      if index > 0:
        x = norm()(x)
      x = nn.leaky_relu(x, self.leaky_slope)
    x = precision.widen(x)
    features = x.reshape(x.shape[0], -1)
    logits = _conv(1, 4, 2, 1, x.dtype, use_bias=True)(x)
    return logits.reshape(-1), features
