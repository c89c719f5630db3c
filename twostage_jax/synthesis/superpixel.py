"""SLIC superpixels on the host.

Two users: SAIM pseudo-anomalies (stored labels of anomaly sources, random
segments of them; source_store.py) and the stage-2 refinement (labels of
each input image, whose superpixels stage 1's map selects).
"""

import numpy as np
from skimage import segmentation


def slic_labels(image: np.ndarray, n_segments: int, compactness: float,
                sigma: float) -> np.ndarray:
  """int32 (H, W) SLIC segment ids (from 0) of an RGB image.

  Args:
    image: (H, W, 3) uint8, or float in [0, 1]; both give the same segments
      up to the uint8 rounding.
    n_segments: approximate number of superpixels.
    compactness: SLIC's colour/space trade-off (higher: squarer segments).
    sigma: Gaussian pre-smoothing of the image.
  """
  labels = segmentation.slic(
      image, n_segments=n_segments, compactness=compactness, sigma=sigma,
      start_label=0, channel_axis=-1)
  return labels.astype(np.int32)


def superpixel_mask(labels: np.ndarray, rng: np.random.Generator,
                    fraction: float) -> np.ndarray:
  """Union of round(fraction * #segment ids) (at least 1) random segments.

  Args:
    labels: integer (H, W) segment ids; negative values (pixels that belong
      to no segment, e.g. the fill a rotation brings in) are never picked.
    rng: random generator for the choice of segments.
    fraction: share of the segment ids present to pick, without replacement.

  Returns:
    bool (H, W) mask; all False if no pixel has a segment id.
  """
  valid = labels >= 0
  if not valid.any():
    return np.zeros(labels.shape, bool)
  ids = np.flatnonzero(np.bincount(labels[valid].ravel()))
  count = min(ids.size, max(1, round(fraction * ids.size)))
  picked = np.zeros(ids[-1] + 1, dtype=bool)
  picked[rng.choice(ids, size=count, replace=False)] = True
  return valid & picked[np.where(valid, labels, 0)]
