"""SLIC superpixels on the host.

Two users: SAIM pseudo-anomalies (cached labels of anomaly sources, random
segments of them) and the stage-2 refinement (labels of each input image,
whose superpixels stage 1's map selects).
"""

import hashlib
import os
import tempfile

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


class SlicCache:
  """SLIC labels per (source, n_segments), computed once.

  SLIC is by far the slowest step of SAIM and depends only on the source and
  the segmentation settings, so labels are kept in memory and, with a
  cache_dir, as one .npy file per (source content hash, n_segments, shape,
  compactness, sigma). Files are written to a temporary name and renamed
  into place, so worker processes sharing the folder never read a partial
  file.
  """

  def __init__(self, compactness: float, sigma: float,
               cache_dir: str | None = None):
    self._compactness = compactness
    self._sigma = sigma
    self._cache_dir = cache_dir
    self._labels: dict[str, np.ndarray] = {}
    if cache_dir:
      os.makedirs(cache_dir, exist_ok=True)

  def _key(self, source: np.ndarray, n_segments: int) -> str:
    digest = hashlib.blake2b(source.tobytes(), digest_size=16).hexdigest()
    shape = 'x'.join(str(d) for d in source.shape)
    return (f'slic_{digest}_n{n_segments}_{shape}_'
            f'c{self._compactness:g}_s{self._sigma:g}')

  def _read(self, path: str) -> np.ndarray | None:
    try:
      return np.load(path)
    except (OSError, ValueError):
      return None

  def _write(self, path: str, labels: np.ndarray) -> None:
    fd, temp_path = tempfile.mkstemp(
        dir=self._cache_dir, prefix='.slic_', suffix='.tmp')
    try:
      with os.fdopen(fd, 'wb') as f:
        np.save(f, labels)
      os.replace(temp_path, path)
    except BaseException:
      os.unlink(temp_path)
      raise

  def labels(self, source: np.ndarray, n_segments: int) -> np.ndarray:
    """int32 (H, W) SLIC labels of a uint8 (H, W, 3) source (ids from 0)."""
    key = self._key(source, n_segments)
    labels = self._labels.get(key)
    if labels is not None:
      return labels
    path = (os.path.join(self._cache_dir, key + '.npy')
            if self._cache_dir else None)
    if path and os.path.exists(path):
      labels = self._read(path)
    if labels is None:
      labels = slic_labels(source, n_segments, self._compactness, self._sigma)
      if path:
        self._write(path, labels)
    self._labels[key] = labels
    return labels


def superpixel_mask(labels: np.ndarray, rng: np.random.Generator,
                    fraction: float) -> np.ndarray:
  """Union of round(fraction * #segment ids) (at least 1) random segments.

  Args:
    labels: integer (H, W) segment ids >= 0, e.g. from SlicCache.labels.
    rng: random generator for the choice of segments.
    fraction: share of the segment ids to pick, without replacement.

  Returns:
    bool (H, W) mask.
  """
  flat = labels.ravel()
  ids = np.flatnonzero(np.bincount(flat))
  count = min(ids.size, max(1, round(fraction * ids.size)))
  picked = np.zeros(ids[-1] + 1, dtype=bool)
  picked[rng.choice(ids, size=count, replace=False)] = True
  return picked[labels]
