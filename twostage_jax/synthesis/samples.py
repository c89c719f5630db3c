"""Training samples as the workers build them: pseudo-anomaly, mask, superpixels."""

import ml_collections
import numpy as np

from twostage_jax.synthesis import pseudo_anomaly
from twostage_jax.synthesis import superpixel


class TrainingSampler:
  """Turns a normal image into one named training sample.

  Stage 1 needs the pseudo-anomalous image and its mask. Stage 2 also needs
  the SLIC labels of that image for the refinement; SLIC is host work and
  the slowest part of it, so it runs here, in the worker processes, next to
  the synthesis.
  """

  def __init__(self, sources: list[np.ndarray],
               synthesis_config: ml_collections.ConfigDict,
               slic_cache_dir: str | None,
               refine_config: ml_collections.ConfigDict | None = None):
    """Builds the sampler.

    Args:
      sources: uint8 anomaly-source images (see PseudoAnomalySynthesizer).
      synthesis_config: the `synthesis` section of the config.
      slic_cache_dir: folder for the sources' SLIC labels; None: memory only.
      refine_config: the `refine` section for stage 2, which adds 'labels';
        None for stage 1.
    """
    self._synthesize = pseudo_anomaly.PseudoAnomalySynthesizer(
        sources, synthesis_config, slic_cache_dir)
    self._refine = refine_config

  def __call__(self, image: np.ndarray, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
    """{'image': float32 (H, W, 3), 'mask': float32 (H, W)[, 'labels': int32 (H, W)]}."""
    image, mask = self._synthesize(image, rng)
    sample = {'image': image, 'mask': mask}
    if self._refine is not None:
      sample['labels'] = superpixel.slic_labels(
          image, self._refine.n_segments, self._refine.compactness,
          self._refine.sigma)
    return sample
