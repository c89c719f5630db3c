"""AnoSeg's objectives: segmentation, masked reconstruction, adversarial, feature matching.

Masks here are in the paper's convention, 1 on *normal* pixels (A of Eqs.
1-6). Means over a subset of the batch (the detector's normal samples) are
taken over the whole data-parallel batch (`weighted_mean`), so a step on 8
devices computes what it computes on one.
"""

import jax
import jax.numpy as jnp
import optax

from twostage_jax import losses as shared_losses
from twostage_jax.training import precision

SEGMENTATION_NORMS = shared_losses.ERROR_NORMS


def segmentation_loss(predicted: jax.Array, target: jax.Array, norm: str) -> jax.Array:
  """L_Seg of Eq. 2: the mean absolute ('l1') or squared ('l2') error of the maps."""
  return shared_losses.mean_error(predicted, target, norm)


def masked_reconstruction_loss(images: jax.Array, reconstructions: jax.Array,
                               normal: jax.Array) -> jax.Array:
  """L_Re of Eq. 4: ||(x - x_hat) * A||_1 / ||A||_1 per sample, averaged over the batch.

  A (B, H, W) is repeated over the channels, so the ratio is the mean
  absolute error per normal pixel and channel. Eq. 4 takes the ratio of two
  batch expectations; the per-sample ratio keeps data-parallel steps exact
  (they average per-device values) and equals it when the samples' normal
  areas are equal. A sample without normal pixels contributes 0.
  """
  weights = jnp.broadcast_to(precision.widen(normal)[..., None], images.shape)
  error = jnp.abs(precision.widen(images) - precision.widen(reconstructions))
  axes = tuple(range(1, images.ndim))
  numerator = jnp.sum(weights * error, axis=axes)
  denominator = jnp.sum(weights, axis=axes)
  positive = denominator > 0
  return jnp.mean(jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0))


def weighted_mean(values: jax.Array, weights: jax.Array, axis_name: str | None) -> jax.Array:
  """This device's share of sum(w * v) / sum(w) over the batch of every device on `axis_name`.

  Per device it is sum_local(w * v) * devices / sum_all(w), whose mean over
  the devices (the step's pmean) is the weighted mean of the whole batch; 0
  when no sample has weight. `axis_name` None: this batch alone.
  """
  weights = precision.widen(weights)
  local = jnp.sum(values * weights)
  total = jnp.sum(weights)
  devices = 1.0
  if axis_name is not None:
    total = jax.lax.psum(total, axis_name)
    devices = jax.lax.psum(1.0, axis_name)
  return jnp.where(total > 0, local * devices / jnp.where(total > 0, total, 1.0), 0.0)


def binary_cross_entropy(logits: jax.Array, label: float) -> jax.Array:
  """Per-sample -log sigmoid(logit) (label 1) or -log(1 - sigmoid(logit)) (label 0)."""
  logits = precision.widen(logits)
  return optax.sigmoid_binary_cross_entropy(logits, jnp.full(logits.shape, label, logits.dtype))


def feature_distance(real: jax.Array, fake: jax.Array) -> jax.Array:
  """Per-sample mean squared difference of (B, F) discriminator features (L_fea, Eq. 5)."""
  return jnp.mean((precision.widen(real) - precision.widen(fake)) ** 2, axis=-1)


def image_distance(images: jax.Array, reconstructions: jax.Array) -> jax.Array:
  """Per-sample mean squared error of (B, H, W, C) images (L_MSE of Eq. 5)."""
  error = precision.widen(images) - precision.widen(reconstructions)
  return jnp.mean(error ** 2, axis=tuple(range(1, images.ndim)))
