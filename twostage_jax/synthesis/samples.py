"""Training samples as the workers build them, one sampler per kind of input.

Per sample the normal image is first augmented geometrically (`augment`, or
the category's entry of `augment_by_category`), then

- `PseudoAnomalySampler` (two-stage model): a pseudo-anomaly and its mask;
  stage 2 also needs the SLIC labels of that image for the refinement. SLIC
  is host work and the slowest part of it, so it runs here, in the workers;
- `DistortionSampler` (Bauer's autoencoder): a patch distortion X̂ of the
  image X, its mask M, and X itself as the target;
- `CutPasteSampler` (AnoSeg): a patch of a hard-augmented copy of the image
  pasted into it, and its mask;
- `NormalSampler` (UTAD): the normal image alone.
"""

import ml_collections
import numpy as np

from twostage_jax.synthesis import cutpaste
from twostage_jax.synthesis import distortion
from twostage_jax.synthesis import geometric
from twostage_jax.synthesis import pseudo_anomaly
from twostage_jax.synthesis import source_store
from twostage_jax.synthesis import superpixel


def augment_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The geometric augmentation of `config.category`."""
  return config.augment_by_category.get(config.category, config.augment)


def _augmented(image: np.ndarray, rng: np.random.Generator,
               augment: ml_collections.ConfigDict) -> np.ndarray:
  return geometric.random_geometric(image, rng, augment.rotations, augment.hflip, augment.vflip)


class PseudoAnomalySampler:
  """Turns a normal image into {'image', 'mask'[, 'labels']} with a pseudo-anomaly."""

  def __init__(self, sources: source_store.SourceStore, config: ml_collections.ConfigDict,
               stage: int, self_sources: source_store.SourceStore | None = None,
               with_labels: bool | None = None):
    """Builds the sampler.

    Args:
      sources: the anomaly sources and their SLIC labels (see
        PseudoAnomalySynthesizer).
      config: the run's config.
      stage: the stage trained; 2 adds the SLIC 'labels' of the image.
      self_sources: the category's normal training images with their SLIC
        labels, for synthesis.p_self_source > 0.
      with_labels: whether to add 'labels'; None: in stage 2. False when the
        refinement computes them on the device.
    """
    self._augment = augment_settings(config)
    self._synthesize = pseudo_anomaly.PseudoAnomalySynthesizer(
        sources, config.synthesis, distortion.PatchDistorter(config.distortion), self_sources)
    if with_labels is None:
      with_labels = stage == 2
    self._refine = config.refine if with_labels else None

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
    """float32 'image' (H, W, 3) and 'mask' (H, W); int32 'labels' (H, W) in stage 2."""
    image, mask = self._synthesize(_augmented(image, rng, self._augment), rng)
    sample = {'image': image, 'mask': mask}
    if self._refine is not None:
      sample['labels'] = superpixel.slic_labels(
          image, self._refine.n_segments, self._refine.compactness, self._refine.sigma)
    return sample


class DistortionSampler:
  """Turns a normal image X into {'image': X̂, 'target': X, 'mask': M}."""

  def __init__(self, config: ml_collections.ConfigDict):
    self._augment = augment_settings(config)
    self._distort = distortion.PatchDistorter(config.distortion)

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
    image = _augmented(image, rng, self._augment)
    distorted, mask = self._distort(image, rng)
    return {'image': distorted, 'target': np.clip(image, 0.0, 1.0, dtype=np.float32),
            'mask': mask}


class CutPasteSampler:
  """Turns a normal image into {'image', 'mask'} with an AnoSeg synthetic anomaly."""

  def __init__(self, config: ml_collections.ConfigDict):
    self._augment = augment_settings(config)
    self._synthesize = cutpaste.HardCutPaste(config.cutpaste)

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
    """float32 'image' (H, W, 3) and 'mask' (H, W), 1 = anomaly."""
    image, mask = self._synthesize(_augmented(image, rng, self._augment), rng)
    return {'image': image, 'mask': mask}


class NormalSampler:
  """Turns a normal image into {'image'}: methods that learn from normal images alone."""

  def __init__(self, config: ml_collections.ConfigDict):
    self._augment = augment_settings(config)

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
    """float32 'image' (H, W, 3), augmented geometrically."""
    return {'image': np.clip(_augmented(image, rng, self._augment), 0.0, 1.0, dtype=np.float32)}
