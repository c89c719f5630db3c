"""Training samples as the workers build them, for either method.

Per sample: the normal image is augmented geometrically (`augment`, or the
category's entry of `augment_by_category`), then

- two-stage model: a pseudo-anomaly and its mask; stage 2 also needs the
  SLIC labels of that image for the refinement. SLIC is host work and the
  slowest part of it, so it runs here, in the worker processes;
- Bauer's autoencoder: a patch distortion X̂ of the image X, its mask M, and
  X itself as the target.
"""

import ml_collections
import numpy as np

from twostage_jax.synthesis import distortion
from twostage_jax.synthesis import geometric
from twostage_jax.synthesis import pseudo_anomaly
from twostage_jax.synthesis import source_store
from twostage_jax.synthesis import superpixel


def augment_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The geometric augmentation of `config.category`."""
  return config.augment_by_category.get(config.category, config.augment)


class TrainingSampler:
  """Turns a normal image into one named training sample."""

  def __init__(self, sources: source_store.SourceStore | None,
               config: ml_collections.ConfigDict, stage: int,
               self_sources: source_store.SourceStore | None = None):
    """Builds the sampler.

    Args:
      sources: the anomaly sources and their SLIC labels (see
        PseudoAnomalySynthesizer); None for Bauer's method, which uses none.
      config: the run's config.
      stage: the two-stage model's stage (2 adds 'labels'); 1 for Bauer.
      self_sources: the category's normal training images with their SLIC
        labels, for synthesis.p_self_source > 0.
    """
    self._config = config
    self._augment = augment_settings(config)
    distorter = distortion.PatchDistorter(config.distortion)
    self._bauer = config.method == 'bauer'
    if self._bauer:
      self._distort = distorter
    else:
      self._synthesize = pseudo_anomaly.PseudoAnomalySynthesizer(
          sources, config.synthesis, distorter, self_sources)
    self._with_labels = not self._bauer and stage == 2

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
    """Named float32 arrays of one sample.

    Two-stage: {'image' (H, W, 3), 'mask' (H, W)[, 'labels' int32 (H, W)]}.
    Bauer: {'image': X̂, 'target': X, 'mask': M}.
    """
    augment = self._augment
    image = geometric.random_geometric(
        image, rng, augment.rotations, augment.hflip, augment.vflip)
    if self._bauer:
      distorted, mask = self._distort(image, rng)
      return {'image': distorted, 'target': np.clip(image, 0.0, 1.0, dtype=np.float32),
              'mask': mask}
    image, mask = self._synthesize(image, rng)
    sample = {'image': image, 'mask': mask}
    if self._with_labels:
      refine = self._config.refine
      sample['labels'] = superpixel.slic_labels(
          image, refine.n_segments, refine.compactness, refine.sigma)
    return sample
