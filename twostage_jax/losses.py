"""Training objectives: SSIM, the two-stage model's SSIM + L2, Bauer's masked contrast.

`mean_error` is the plain L1 / L2 error other objectives build on.

SSIM follows DRAEM's and the two-stage model's PyTorch code: an 11x11
Gaussian window (sigma 1.5) applied with zero "same" padding, C1 = 0.01^2,
C2 = 0.03^2, averaged over the full map. dm-pix filters with "valid"
padding, so its `ssim` is given a `filter_fn` with zero "same" padding. Away
from a `window // 2` pixel border this map equals scikit-image's Gaussian
SSIM (which pads by reflection and crops that border before averaging).

Bauer's masked contrast objectives for the self-supervised autoencoder.

Per sample, with network output F = F(X_hat) for a partly modified input
X_hat, the normal image X, the binary mask M of modified pixels, M_bar = 1 - M,
D = |X_hat - X| and lam in [0, 1], all of the image's shape (H, W, 3):

  (1) lam / |M_bar|_1 * ||M_bar * (F - X)||_2 + (1 - lam) / |M|_1 * ||M * (F - X)||_2
  (3) lam / |M_bar|_1 * ||M_bar * (F - X)||_2 - (1 - lam) / |D|_1 * ||D * (F - X)||_2

||.||_2 is the Euclidean norm of the whole tensor, |.|_1 its sum. The masks
arrive as (H, W) and are repeated over the channels, as the paper's
M in {0, 1}^(n x m x 3): |M_bar|_1 and |D|_1 then count the same elements.
Objective (1) asks for an inpainting of the modified region; objective (3)
keeps the normal region faithful and pushes the output away from X where the
input was modified, weighted by how much it was modified. Objective (3) is
unbounded below on its own: the autoencoder's sigmoid output bounds it.

Degenerate samples are well defined: a term whose normaliser |.|_1 is zero
contributes 0. That happens when a sample has no modification (M empty,
D = 0) or when M covers the whole image. Norms use the double-`where`
pattern, so a norm of an exactly zero tensor has value 0 and gradient 0
instead of the NaN that differentiating sqrt at 0 would give.
"""

from collections.abc import Callable

import dm_pix
import jax
import jax.numpy as jnp
import ml_collections

from twostage_jax.training import precision


def _blur_matrix(size: int, taps: jax.Array) -> jax.Array:
  """(size, size) matrix of a 1-D 'same' filtering with zero padding.

  Row i holds the taps centred on column i, cut off at the borders: the
  samples they would weigh outside the signal are the zero padding.
  """
  offset = jnp.arange(size)[None, :] - jnp.arange(size)[:, None] + taps.shape[0] // 2
  inside = (offset >= 0) & (offset < taps.shape[0])
  return jnp.where(inside, taps[jnp.clip(offset, 0, taps.shape[0] - 1)], 0.0)


def gaussian_filter_same(window: int, sigma: float) -> Callable[[jax.Array], jax.Array]:
  """A separable Gaussian blur of (..., H, W, C) arrays with zero padding.

  Each 1-D pass multiplies by a banded (H, H) or (W, W) matrix: H or W
  multiply-adds per pixel instead of `window`, but in a matrix product,
  which (with its gradient) XLA runs several times faster than the
  one-channel depthwise convolutions of the direct form.
  """
  offsets = jnp.arange(window, dtype=jnp.float32) - (window - 1) / 2
  taps = jnp.exp(-0.5 * (offsets / sigma) ** 2)
  taps = taps / taps.sum()

  def blur(x: jax.Array) -> jax.Array:
    rows = _blur_matrix(x.shape[-3], taps).astype(x.dtype)
    columns = _blur_matrix(x.shape[-2], taps).astype(x.dtype)
    y = jnp.einsum('ij,...jwc->...iwc', rows, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum('vw,...iwc->...ivc', columns, y, precision=jax.lax.Precision.HIGHEST)

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
  prediction = precision.widen(prediction)
  l2 = jnp.mean((prediction - target) ** 2)
  ssim = jnp.mean(ssim_map(prediction, target, config))
  loss = config.l2_weight * l2 + config.ssim_weight * (1.0 - ssim)
  return loss, {'loss': loss, 'l2': l2, 'ssim': ssim}


ERROR_NORMS = ('l1', 'l2')


def mean_error(predicted: jax.Array, target: jax.Array, norm: str) -> jax.Array:
  """The mean absolute ('l1') or squared ('l2') error, in at least float32."""
  error = precision.widen(predicted) - precision.widen(target)
  if norm == 'l1':
    return jnp.mean(jnp.abs(error))
  if norm == 'l2':
    return jnp.mean(error ** 2)
  raise ValueError(f'error norm {norm!r} must be one of {ERROR_NORMS}')


OBJECTIVES = (1, 3)


def _per_sample_sum(x: jax.Array) -> jax.Array:
  """Sum of (B, ...) over everything but the batch axis."""
  return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _safe_norm(x: jax.Array) -> jax.Array:
  """Per-sample Euclidean norm of (B, ...) with a zero gradient at 0."""
  squared = _per_sample_sum(x * x)
  positive = squared > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def _safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, and 0 (with zero gradient) where it is 0."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0), 0.0)


def _weighted_error(weights: jax.Array, error: jax.Array,
                    normaliser: jax.Array) -> jax.Array:
  """||weights * error||_2 / normaliser per sample."""
  return _safe_ratio(_safe_norm(weights * error), normaliser)


def _terms(output: jax.Array, target: jax.Array, distorted: jax.Array | None,
           mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Unweighted normal term and modified term (over M, or over D if given)."""
  error = precision.widen(output) - precision.widen(target)
  mask = jnp.broadcast_to(mask.astype(error.dtype)[..., None], error.shape)
  normal = 1.0 - mask
  normal_term = _weighted_error(normal, error, _per_sample_sum(normal))
  if distorted is None:
    modified_term = _weighted_error(mask, error, _per_sample_sum(mask))
  else:
    difference = jnp.abs(precision.widen(distorted) - precision.widen(target))
    modified_term = _weighted_error(difference, error, _per_sample_sum(difference))
  return normal_term, modified_term


def masked_contrast_loss(
    output: jax.Array, target: jax.Array, distorted: jax.Array,
    mask: jax.Array, config: ml_collections.ConfigDict,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The batch-mean objective chosen by the config, and its terms.

  Args:
    output: network outputs F(X_hat), (B, H, W, C).
    target: normal images X, (B, H, W, C).
    distorted: network inputs X_hat, (B, H, W, C).
    mask: masks M of modified pixels, (B, H, W) in {0, 1}.
    config: config section with `objective` (1 or 3) and `lam` (lambda).

  Returns:
    The scalar loss and batch means of 'loss', 'normal_term' and
    'modified_term'. The terms are weighted by lam and 1 - lam and reported
    unsigned: loss = normal_term + modified_term for objective 1 and
    normal_term - modified_term for objective 3.
  """
  if config.objective not in OBJECTIVES:
    raise ValueError(
        f'config key `objective` must be one of {OBJECTIVES}; got {config.objective!r}')
  if not 0.0 <= config.lam <= 1.0:
    raise ValueError(f'config key `lam` must lie in [0, 1]; got {config.lam!r}')
  lam = config.lam
  if config.objective == 1:
    normal_term, modified_term = _terms(output, target, None, mask)
    sign = 1.0
  else:
    normal_term, modified_term = _terms(output, target, distorted, mask)
    sign = -1.0
  normal_term = jnp.mean(lam * normal_term)
  modified_term = jnp.mean((1.0 - lam) * modified_term)
  loss = normal_term + sign * modified_term
  return loss, {'loss': loss, 'normal_term': normal_term, 'modified_term': modified_term}
