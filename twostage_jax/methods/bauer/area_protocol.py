"""Bauer's evaluation protocol: a threshold fixed by a minimum defect area.

A defect smaller than a category's minimum area is not worth flagging. The
anomaly-map threshold t is set on held-out normal images: the smallest t at
which the largest connected component of every held-out map's {map >= t}
stays below the minimum area, so that no held-out normal image would be
flagged. On the test set an image is then predicted defective when its
thresholded map has a component of at least the minimum area, and its
predicted defect pixels are the union of those components. The protocol
reports TPR and TNR over images, their mean, image F1 and pixel F1 (pooled
over the test pixels) at that operating point.

Components are 8-connected, as for the regions of AUPRO.
"""

import numpy as np
import scipy.ndimage

_EIGHT_CONNECTED = np.ones((3, 3), bool)


def _component_sizes(flags: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Labels of the 8-connected components of one (H, W) map, and their sizes (index 0: none)."""
  labels, count = scipy.ndimage.label(flags, _EIGHT_CONNECTED)
  return labels, np.bincount(labels.ravel(), minlength=count + 1)


def largest_component(maps: np.ndarray, threshold: float) -> np.ndarray:
  """(N,) area in pixels of the largest component of each map's {map >= threshold}."""
  out = np.zeros(len(maps), np.int64)
  for i, anomaly_map in enumerate(maps):
    sizes = _component_sizes(anomaly_map >= threshold)[1]
    out[i] = sizes[1:].max(initial=0)
  return out


def area_threshold(normal_maps: np.ndarray, min_area: int) -> float:
  """The smallest map value t with every normal map's largest component < min_area.

  The largest component can only shrink as t grows, so a binary search over
  the maps' distinct values finds t with a logarithmic number of labelings.

  Args:
    normal_maps: (N, H, W) anomaly maps of held-out normal images.
    min_area: the minimum defect area in pixels, at least 1.

  Raises:
    ValueError: for no maps or a min_area below 1.
  """
  normal_maps = np.asarray(normal_maps)
  if normal_maps.ndim != 3 or len(normal_maps) == 0:
    raise ValueError(f'need (N, H, W) normal maps with N > 0, got shape {normal_maps.shape}')
  if min_area < 1:
    raise ValueError(f'min_area must be at least 1 pixel, got {min_area}')
  candidates = np.unique(normal_maps)
  # Above the largest value nothing is flagged; that always satisfies the rule.
  candidates = np.append(candidates, np.nextafter(candidates[-1], np.inf))
  low, high = 0, len(candidates) - 1  # the answer's index lies in [low, high]
  while low < high:
    middle = (low + high) // 2
    if largest_component(normal_maps, candidates[middle]).max() < min_area:
      high = middle
    else:
      low = middle + 1
  return float(candidates[low])


def defect_pixels(maps: np.ndarray, threshold: float, min_area: int) -> np.ndarray:
  """bool (N, H, W): the components of {map >= threshold} of at least min_area pixels."""
  out = np.zeros(maps.shape, bool)
  for i, anomaly_map in enumerate(maps):
    labels, sizes = _component_sizes(anomaly_map >= threshold)
    keep = sizes >= min_area
    keep[0] = False
    out[i] = keep[labels]
  return out


def _f1(predicted: np.ndarray, actual: np.ndarray) -> float:
  true_positives = np.sum(predicted & actual)
  denominator = predicted.sum() + actual.sum()
  return float(2 * true_positives / denominator) if denominator else 1.0


def evaluate_at_area_threshold(maps: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                               threshold: float, min_area: int) -> dict[str, float]:
  """TPR, TNR, their mean, image F1 and pixel F1 of the test set at `threshold`.

  Args:
    maps: (N, H, W) test anomaly maps.
    masks: (N, H, W) ground-truth defect masks.
    labels: (N,) truthy for defective images.
    threshold: the map threshold, from `area_threshold` on normal images.
    min_area: the minimum defect area in pixels.

  Raises:
    ValueError: on mismatched shapes or a test set without both classes.
  """
  maps, masks = np.asarray(maps), np.asarray(masks).astype(bool)
  labels = np.asarray(labels).astype(bool)
  if maps.shape != masks.shape or labels.shape != maps.shape[:1]:
    raise ValueError(f'maps {maps.shape}, masks {masks.shape} and labels {labels.shape} '
                     'do not describe the same images')
  if labels.all() or not labels.any():
    raise ValueError('the protocol needs both normal and defective test images')
  predicted_pixels = defect_pixels(maps, threshold, min_area)
  predicted = predicted_pixels.any(axis=(1, 2))
  tpr = float(np.mean(predicted[labels]))
  tnr = float(np.mean(~predicted[~labels]))
  return {
      'threshold': float(threshold),
      'min_area': int(min_area),
      'tpr': tpr,
      'tnr': tnr,
      'mean_tpr_tnr': (tpr + tnr) / 2,
      'image_f1': _f1(predicted, labels),
      'pixel_f1': _f1(predicted_pixels, masks),
  }
