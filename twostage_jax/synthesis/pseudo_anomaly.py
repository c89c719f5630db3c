"""Per-sample pseudo-anomalies: DRAEM's Perlin blends and SAIM's superpixels."""

from typing import Callable

import ml_collections
import numpy as np

from twostage_jax.synthesis import augment
from twostage_jax.synthesis import perlin
from twostage_jax.synthesis import superpixel


class PseudoAnomalySynthesizer:
  """Turns a normal image into a (possibly) anomalous one and its mask.

  Per sample: no anomaly with probability 1 - p_anomaly; otherwise, with
  probability p_distortion, Bauer's patch distortion (the `distorter`), else
  a Perlin anomaly with probability p_perlin, else a SAIM superpixel anomaly.

  - Perlin: mask M from perlin.perlin_mask; texture = a random source through
    num_augmenters augmenters; beta ~ U(0, beta_max);
    x' = x (1 - M) + (1 - beta) texture M + beta x M.
  - SAIM: cached SLIC labels of a random (un-augmented) source with
    n_segments drawn from saim_n_segments; M = saim_fraction of its
    segments; the augmented source, rotated by an angle from
    saim_rotations, replaces x on M without blending.

  The returned mask is exactly the set of pixels that changed, i.e. the
  candidate mask AND (any channel of x' != x): where the texture happens to
  equal the image nothing anomalous was made. An all-zero mask therefore
  always comes with an unchanged image and means "no anomaly".
  """

  def __init__(self, sources: list[np.ndarray],
               config: ml_collections.ConfigDict,
               slic_cache_dir: str | None = None,
               distorter: Callable[[np.ndarray, np.random.Generator],
                                   tuple[np.ndarray, np.ndarray]] | None = None):
    """Builds the synthesizer.

    Args:
      sources: uint8 (S, S, 3) anomaly-source images, all of the size of the
        images that will be passed in (square, for the 90-degree rotations).
      config: the synthesis section of the config.
      slic_cache_dir: folder for SLIC labels shared between processes; None
        keeps them in memory only.
      distorter: the patch distortion (synthesis.PatchDistorter), needed
        when config.p_distortion > 0.
    """
    if config.p_distortion > 0 and distorter is None:
      raise ValueError('synthesis.p_distortion > 0 needs a distorter (PatchDistorter).')
    if not sources:
      raise ValueError('PseudoAnomalySynthesizer needs at least one source.')
    shape = sources[0].shape
    for source in sources:
      if (source.dtype != np.uint8 or source.ndim != 3 or source.shape[2] != 3
          or source.shape[0] != source.shape[1] or source.shape != shape):
        raise ValueError(
            'Anomaly sources must be square uint8 (S, S, 3) arrays of one '
            f'size; got {source.dtype} {source.shape} next to {shape}.')
    for angle in config.saim_rotations:
      if angle % 90:
        raise ValueError(f'saim_rotations must be multiples of 90: {angle}.')
    self._sources = list(sources)
    self._config = config
    self._distort = distorter
    self._slic = superpixel.SlicCache(
        config.saim_compactness, config.saim_sigma, slic_cache_dir)

  @property
  def slic_cache(self) -> superpixel.SlicCache:
    """The SLIC label cache, e.g. to warm it before training starts."""
    return self._slic

  def _texture(self, index: int, rng: np.random.Generator) -> np.ndarray:
    return augment.random_augment(
        self._sources[index], rng, self._config.num_augmenters)

  def _perlin(self, image: np.ndarray, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Candidate mask and the blended values of its pixels (k, 3)."""
    mask = perlin.perlin_mask(image.shape[:2], rng, self._config)
    index = rng.integers(len(self._sources))
    texture = self._texture(index, rng)[mask].astype(np.float32) / 255.0
    beta = np.float32(rng.uniform(0.0, self._config.beta_max))
    # x + (1 - beta)(t - x) is the blend above; it returns x bit-exactly
    # where t == x, so such pixels do not count as changed.
    old = image[mask]
    return mask, old + (1.0 - beta) * (texture - old)

  def _superpixel(self, image: np.ndarray, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Candidate mask and the pasted values of its pixels (k, 3)."""
    config = self._config
    index = rng.integers(len(self._sources))
    n_segments = config.saim_n_segments[rng.integers(
        len(config.saim_n_segments))]
    labels = self._slic.labels(self._sources[index], n_segments)
    mask = superpixel.superpixel_mask(labels, rng, config.saim_fraction)
    angle = config.saim_rotations[rng.integers(len(config.saim_rotations))]
    texture = np.rot90(self._texture(index, rng), k=angle // 90)
    return mask, texture[mask].astype(np.float32) / 255.0

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """Draws one training sample.

    Args:
      image: float32 (H, W, 3) normal image in [0, 1] (clipped to it), of
        the sources' size.
      rng: random generator; the same state gives the same sample.

    Returns:
      (float32 (H, W, 3) image in [0, 1], float32 (H, W) mask of exactly
      the changed pixels, 1 = anomalous).
    """
    if image.shape != self._sources[0].shape:
      raise ValueError(f'Image shape {image.shape} does not match the anomaly '
                       f'sources {self._sources[0].shape}.')
    out = np.clip(image, 0.0, 1.0, dtype=np.float32)
    mask = np.zeros(out.shape[:2], np.float32)
    if rng.random() >= self._config.p_anomaly:
      return out, mask
    # Drawn only when the generator is on, so the papers' stream stays as is.
    if self._config.p_distortion > 0 and rng.random() < self._config.p_distortion:
      return self._distort(out, rng)
    if rng.random() < self._config.p_perlin:
      candidate, values = self._perlin(out, rng)
    else:
      candidate, values = self._superpixel(out, rng)
    # Only the candidate pixels are touched, which keeps the cost of a
    # sample proportional to the anomaly's area.
    rows, cols = np.nonzero(candidate)
    values = np.clip(values, 0.0, 1.0)
    differs = values != out[rows, cols]
    changed = differs[:, 0] | differs[:, 1] | differs[:, 2]
    rows, cols = rows[changed], cols[changed]
    out[rows, cols] = values[changed]
    mask[rows, cols] = 1.0
    return out, mask
