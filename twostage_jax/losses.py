"""Training objectives: SSIM and the stage-1 SSIM + L2 objective.

SSIM follows DRAEM's and the two-stage model's PyTorch code: an 11x11
Gaussian window (sigma 1.5) applied with zero "same" padding, C1 = 0.01^2,
C2 = 0.03^2, averaged over the full map. dm-pix filters with "valid"
padding, so its `ssim` is given a `filter_fn` with zero "same" padding. Away
from a `window // 2` pixel border this map equals scikit-image's Gaussian
SSIM (which pads by reflection and crops that border before averaging).
"""

from typing import Callable

import dm_pix
import jax
import jax.numpy as jnp
import ml_collections


def gaussian_filter_same(window: int, sigma: float) -> Callable[[jax.Array], jax.Array]:
  """A separable Gaussian blur of (..., H, W, C) arrays with zero padding."""
  offsets = jnp.arange(window, dtype=jnp.float32) - (window - 1) / 2
  taps = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  taps = taps / taps.sum()

  def blur(x: jax.Array) -> jax.Array:
    lead = x.shape[:-3]
    h, w, c = x.shape[-3:]
    y = x.reshape((-1, h, w, c))
    for kernel_shape in ((window, 1), (1, window)):
      kernel = jnp.broadcast_to(taps.reshape(kernel_shape + (1, 1)), kernel_shape + (1, c))
      y = jax.lax.conv_general_dilated(
          y, kernel.astype(y.dtype), (1, 1), 'SAME',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=c,
          precision=jax.lax.Precision.HIGHEST)
    return y.reshape(lead + (h, w, c))

  return blur


def ssim_map(a: jax.Array, b: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """Per-pixel SSIM of two (..., H, W) maps with values in [0, 1]."""
  return dm_pix.ssim(
      a[..., None], b[..., None],
      max_val=1.0,
      filter_size=config.ssim_window,
      filter_sigma=config.ssim_sigma,
      k1=config.ssim_k1,
      k2=config.ssim_k2,
      return_map=True,
      filter_fn=gaussian_filter_same(config.ssim_window, config.ssim_sigma),
  )[..., 0]


def ssim_l2_loss(prediction: jax.Array, target: jax.Array,
                 config: ml_collections.ConfigDict) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Stage-1 objective: l2_weight * MSE + ssim_weight * (1 - mean SSIM).

  Args:
    prediction: predicted anomaly maps (B, H, W).
    target: pseudo-anomaly masks (B, H, W) in {0, 1}.
    config: the `loss` section of the config.

  Returns:
    The scalar loss and its two terms.
  """
  prediction = prediction.astype(jnp.float32)
  l2 = jnp.mean((prediction - target) ** 2)
  ssim = jnp.mean(ssim_map(prediction, target, config))
  loss = config.l2_weight * l2 + config.ssim_weight * (1.0 - ssim)
  return loss, {'loss': loss, 'l2': l2, 'ssim': ssim}
