"""Per-sample pseudo-anomalies: DRAEM's Perlin blends and SAIM's superpixels."""

from typing import Callable

import ml_collections
import numpy as np

from twostage_jax.synthesis import augment
from twostage_jax.synthesis import perlin
from twostage_jax.synthesis import source_store
from twostage_jax.synthesis import superpixel


def superpixel_paste(source: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
                     config: ml_collections.ConfigDict
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """SAIM's candidate mask and texture, cut along superpixels of the texture itself.

  The source is augmented (num_augmenters of the recipe's augmenters) and turned
  by an angle of saim_rotations; its SLIC labels undergo the same rotations
  (the augmenters' +-45 degree one included), so the superpixels follow the
  content that is pasted, as when the transformed source is segmented (the
  authors' PAI-lib). saim_fraction of the segments present are picked;
  pixels a rotation brought in from outside the source are never pasted.

  Args:
    source: uint8 (S, S, 3) anomaly source.
    labels: its (S, S) SLIC ids.
    rng: random generator.
    config: the synthesis section of the config.

  Returns:
    (bool (S, S) candidate mask, uint8 (S, S, 3) texture, int32 (S, S)
    labels in the texture's geometry, augment.OUTSIDE outside the source).
  """
  texture, labels = augment.random_augment(source, rng, config.num_augmenters, labels,
                                           augment.POOLS[config.recipe])
  turns = config.saim_rotations[rng.integers(len(config.saim_rotations))] // 90
  texture, labels = np.rot90(texture, k=turns), np.rot90(labels, k=turns)
  return superpixel.superpixel_mask(labels, rng, config.saim_fraction), texture, labels


class PseudoAnomalySynthesizer:
  """Turns a normal image into a (possibly) anomalous one and its mask.

  Per sample: no anomaly with probability 1 - p_anomaly; otherwise, with
  probability p_distortion, Bauer's patch distortion (the `distorter`), else
  a Perlin anomaly with probability p_perlin, else a SAIM superpixel anomaly.
  The texture of either comes from a random anomaly source, or with
  probability p_self_source from a random normal image of the category
  (the public code adds the category's training images to the sources of
  its stage 2: pastes of the object's own structure, colour-consistent but
  out of place).

  - Perlin: mask M from perlin.perlin_mask; texture = a random source through
    num_augmenters augmenters of the recipe's pool (augment.POOLS); beta ~
    U(0, beta_max);
    x' = x (1 - M) + (1 - beta) texture M + beta x M.
  - SAIM: a random source with its stored SLIC labels for an n_segments drawn
    from saim_n_segments, cut and pasted by `superpixel_paste` without
    blending.

  The returned mask is exactly the set of pixels that changed, i.e. the
  candidate mask AND (any channel of x' != x): where the texture happens to
  equal the image nothing anomalous was made. An all-zero mask therefore
  always comes with an unchanged image and means "no anomaly".
  """

  def __init__(self, sources: source_store.SourceStore,
               config: ml_collections.ConfigDict,
               distorter: Callable[[np.ndarray, np.random.Generator],
                                   tuple[np.ndarray, np.ndarray]] | None = None,
               self_sources: source_store.SourceStore | None = None):
    """Builds the synthesizer.

    Args:
      sources: the anomaly sources and their SLIC labels for every
        saim_n_segments, of the size of the images that will be passed in.
      config: the synthesis section of the config.
      distorter: the patch distortion (synthesis.PatchDistorter), needed
        when config.p_distortion > 0.
      self_sources: normal images of the category with their SLIC labels,
        drawn as the source instead of `sources` with probability
        config.p_self_source (needed when it is > 0).
    """
    if config.p_distortion > 0 and distorter is None:
      raise ValueError('synthesis.p_distortion > 0 needs a distorter (PatchDistorter).')
    if config.p_self_source > 0 and self_sources is None:
      raise ValueError('synthesis.p_self_source > 0 needs the normal images as self_sources.')
    for store in (sources, self_sources) if self_sources else (sources,):
      missing = set(config.saim_n_segments) - set(store.n_segments)
      if missing:
        raise ValueError(f'the source store has no SLIC labels for saim_n_segments '
                         f'{sorted(missing)}; it holds {list(store.n_segments)}')
      if store.image_shape != sources.image_shape:
        raise ValueError(f'self_sources of shape {store.image_shape} next to anomaly '
                         f'sources of shape {sources.image_shape}')
    if config.recipe not in augment.POOLS:
      raise ValueError(f'synthesis.recipe {config.recipe!r} is none of {sorted(augment.POOLS)}')
    if config.num_augmenters > len(augment.POOLS[config.recipe]):
      raise ValueError(f'synthesis.num_augmenters = {config.num_augmenters} exceeds the '
                       f'{len(augment.POOLS[config.recipe])} augmenters of recipe '
                       f'{config.recipe!r}')
    for angle in config.saim_rotations:
      if angle % 90:
        raise ValueError(f'saim_rotations must be multiples of 90: {angle}.')
    self._sources = sources
    self._self_sources = self_sources
    self._config = config
    self._distort = distorter

  def _draw_source(self, rng: np.random.Generator) -> tuple[source_store.SourceStore, int]:
    """A store (self sources with probability p_self_source) and an index in it."""
    store = self._sources
    # Drawn only when the option is on, so the papers' stream stays as is.
    if self._config.p_self_source > 0 and rng.random() < self._config.p_self_source:
      store = self._self_sources
    return store, rng.integers(len(store))

  def _perlin(self, image: np.ndarray, rng: np.random.Generator
              ) -> tuple[np.ndarray, np.ndarray]:
    """Candidate mask and the blended values of its pixels (k, 3)."""
    mask = perlin.perlin_mask(image.shape[:2], rng, self._config)
    store, index = self._draw_source(rng)
    texture, _ = augment.random_augment(store.images[index], rng, self._config.num_augmenters,
                                        pool=augment.POOLS[self._config.recipe])
    texture = texture[mask].astype(np.float32) / 255.0
    beta = np.float32(rng.uniform(0.0, self._config.beta_max))
    # x + (1 - beta)(t - x) is the blend above; it returns x bit-exactly
    # where t == x, so such pixels do not count as changed.
    old = image[mask]
    return mask, old + (1.0 - beta) * (texture - old)

  def _superpixel(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Candidate mask and the pasted values of its pixels (k, 3)."""
    config = self._config
    store, index = self._draw_source(rng)
    n_segments = config.saim_n_segments[rng.integers(len(config.saim_n_segments))]
    mask, texture, _ = superpixel_paste(
        store.images[index], store.labels(n_segments)[index], rng, config)
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
    if image.shape != self._sources.image_shape:
      raise ValueError(f'Image shape {image.shape} does not match the anomaly '
                       f'sources {self._sources.image_shape}.')
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
      candidate, values = self._superpixel(rng)
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
