"""Detection and segmentation metrics, vectorised over all scores at once."""

import numpy as np
import scipy.ndimage
import scipy.stats


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve, ties counted half (Mann-Whitney U / (n+ n-)).

  Args:
    scores: anomaly scores of any shape; higher means more anomalous.
    labels: same shape, truthy for anomalous.

  Raises:
    ValueError: if the labels hold only one class (the area is undefined).
  """
  scores = np.asarray(scores, dtype=np.float64).ravel()
  labels = np.asarray(labels).ravel().astype(bool)
  if scores.shape != labels.shape:
    raise ValueError(f'{scores.size} scores but {labels.size} labels')
  positives = int(labels.sum())
  negatives = labels.size - positives
  if positives == 0 or negatives == 0:
    raise ValueError('AUROC needs both normal and anomalous samples; '
                     f'got {positives} anomalous and {negatives} normal')
  ranks = scipy.stats.rankdata(scores)
  u = ranks[labels].sum() - positives * (positives + 1) / 2
  return float(u / (positives * negatives))


def _paired(scores: np.ndarray, labels: np.ndarray,
            names: tuple[str, str] = ('scores', 'labels'),
            ) -> tuple[np.ndarray, np.ndarray]:
  """Flattens scores and boolean labels after checking their shapes agree."""
  scores = np.asarray(scores, dtype=np.float64)
  labels = np.asarray(labels)
  if scores.shape != labels.shape:
    raise ValueError(f'{names[0]} of shape {scores.shape} but {names[1]} of '
                     f'shape {labels.shape}')
  return scores.ravel(), labels.ravel().astype(bool)


def _cumulative_at_thresholds(scores: np.ndarray, *weights: np.ndarray,
                              ) -> tuple[np.ndarray, list[np.ndarray]]:
  """Sums of each weight over {score >= t} for each distinct t, highest first.

  One sort plus a cumulative sum read off at the last element of each run of
  equal scores gives every threshold at once, and never splits a tie.
  """
  order = np.argsort(scores)[::-1]
  ordered = scores[order]
  changes = np.flatnonzero(ordered[1:] != ordered[:-1])
  last = np.append(changes, ordered.size - 1)
  return ordered[last], [np.cumsum(w[order])[last] for w in weights]


def _positive_counts(scores: np.ndarray, labels: np.ndarray, metric: str,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
  """True and all predicted positives per threshold, and the positive count."""
  positives = int(labels.sum())
  if positives == 0:
    raise ValueError(f'{metric} needs at least one anomalous sample')
  thresholds, (tp, predicted) = _cumulative_at_thresholds(
      scores, labels.astype(np.int64), np.ones(scores.size, np.int64))
  return thresholds, tp, predicted, positives


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
  """Step-wise area under the precision-recall curve, sum of (R_n - R_n-1) P_n.

  Matches scikit-learn's average_precision_score: no interpolation, which
  would be optimistic, and one step per distinct score so ties are grouped.

  Args:
    scores: anomaly scores of any shape; higher means more anomalous.
    labels: same shape, truthy for anomalous.

  Raises:
    ValueError: on mismatched shapes or if no label is anomalous.
  """
  scores, labels = _paired(scores, labels)
  _, tp, predicted, positives = _positive_counts(scores, labels, 'AP')
  recall_steps = np.diff(tp, prepend=0) / positives
  return float(np.sum(recall_steps * (tp / predicted)))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
  """Best F1 over all thresholds (score >= t is anomalous), and that t.

  Reports the operating point a tuned threshold would reach; on ties of F1
  the highest threshold wins.

  Args:
    scores: anomaly scores of any shape; higher means more anomalous.
    labels: same shape, truthy for anomalous.

  Returns:
    (F1, threshold).

  Raises:
    ValueError: on mismatched shapes or if no label is anomalous.
  """
  scores, labels = _paired(scores, labels)
  thresholds, tp, predicted, positives = _positive_counts(scores, labels, 'F1')
  f1 = 2 * tp / (predicted + positives)
  best = int(np.argmax(f1))
  return float(f1[best]), float(thresholds[best])


def iou_max(maps: np.ndarray, masks: np.ndarray) -> tuple[float, float]:
  """Best pooled IoU of (map >= t) with the masks over all t, and that t.

  IoU = TP / (TP + FP + FN) over all pixels of all images together, so large
  defects weigh more than small ones; on ties the highest threshold wins.

  Args:
    maps: anomaly maps of any shape; higher means more anomalous.
    masks: same shape, truthy on anomalous pixels.

  Returns:
    (IoU, threshold).

  Raises:
    ValueError: on mismatched shapes or if no pixel is anomalous.
  """
  maps, masks = _paired(maps, masks, ('maps', 'masks'))
  thresholds, tp, predicted, positives = _positive_counts(maps, masks, 'IoU')
  iou = tp / (predicted + positives - tp)
  best = int(np.argmax(iou))
  return float(iou[best]), float(thresholds[best])


def roc_curve(scores: np.ndarray, labels: np.ndarray,
              ) -> tuple[np.ndarray, np.ndarray]:
  """ROC curve points (FPR, TPR), one per distinct score, from (0, 0) to (1, 1).

  Tied scores form one point, so the trapezoidal area under the curve counts
  them half and equals `auroc`.

  Args:
    scores: anomaly scores of any shape; higher means more anomalous.
    labels: same shape, truthy for anomalous.

  Returns:
    (fpr, tpr), each of length (number of distinct scores + 1).

  Raises:
    ValueError: on mismatched shapes or if the labels hold only one class.
  """
  scores, labels = _paired(scores, labels)
  positives = int(labels.sum())
  negatives = labels.size - positives
  if positives == 0 or negatives == 0:
    raise ValueError('ROC curve needs both normal and anomalous samples; '
                     f'got {positives} anomalous and {negatives} normal')
  _, (tp, fp) = _cumulative_at_thresholds(
      scores, labels.astype(np.int64), (~labels).astype(np.int64))
  fpr = np.concatenate([[0], fp]) / negatives
  tpr = np.concatenate([[0], tp]) / positives
  return fpr, tpr


def pro_curve(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3,
              ) -> tuple[np.ndarray, np.ndarray]:
  """Per-region-overlap curve (FPR, PRO) from FPR 0 up to exactly max_fpr.

  Unlike pixel AUROC, every connected defect counts equally however small
  (Bergmann et al., MVTec AD). Regions are 8-connected components of each
  image's mask, as in the MVTec AD reference evaluation; they never span
  images. For each threshold t, PRO is the mean over all regions of the
  share of the region with map >= t, and FPR the share of all normal pixels
  (pooled) with map >= t. The curve starts at (0, 0) and its last point is
  PRO interpolated linearly at exactly max_fpr, so that its trapezoidal area
  is the one `aupro` normalises.

  Args:
    maps: anomaly maps, (H, W) or (N, H, W); higher means more anomalous.
    masks: same shape, truthy on anomalous pixels.
    max_fpr: upper end of the FPR range, in (0, 1].

  Returns:
    (fpr, pro), both non-decreasing, fpr ending at max_fpr.

  Raises:
    ValueError: on mismatched or non-image shapes, max_fpr outside (0, 1],
      or masks with no anomalous region or no normal pixel.
  """
  maps = np.asarray(maps, dtype=np.float64)
  masks = np.asarray(masks).astype(bool)
  if maps.shape != masks.shape:
    raise ValueError(f'maps of shape {maps.shape} but masks of shape '
                     f'{masks.shape}')
  if maps.ndim not in (2, 3):
    raise ValueError(f'AUPRO needs (H, W) or (N, H, W) maps, got {maps.shape}')
  if not 0 < max_fpr <= 1:
    raise ValueError(f'max_fpr must lie in (0, 1], got {max_fpr}')
  # 8-connected within an image, never across the image axis.
  structure = np.zeros((3, 3, 3), bool)
  structure[1] = True
  regions, num_regions = scipy.ndimage.label(
      masks.reshape((-1,) + masks.shape[-2:]), structure)
  regions = regions.ravel()
  normal = ~masks.ravel()
  num_normal = int(normal.sum())
  if num_regions == 0:
    raise ValueError('AUPRO needs at least one anomalous region in the masks')
  if num_normal == 0:
    raise ValueError('AUPRO needs at least one normal pixel in the masks')
  # A pixel of region r adds 1 / (|r| * num_regions) to PRO once it turns
  # positive; label 0 (normal) adds nothing. FPR counts in integers so that
  # the curve ends at exactly 1.
  region_weight = 1 / (np.bincount(regions) * num_regions)
  region_weight[0] = 0
  _, (pro, false_positives) = _cumulative_at_thresholds(
      maps.ravel(), region_weight[regions], normal.astype(np.int64))
  pro = np.concatenate([[0.0], pro])
  fpr = np.concatenate([[0], false_positives]) / num_normal
  # The last curve point is FPR 1 >= max_fpr, so `inside` < len(fpr) unless
  # max_fpr is reached exactly, in which case no interpolation is needed.
  inside = int(np.searchsorted(fpr, max_fpr, side='right'))
  pro_end, fpr_end = pro[:inside], fpr[:inside]
  if fpr_end[-1] < max_fpr:
    lo, hi = inside - 1, inside
    share = (max_fpr - fpr[lo]) / (fpr[hi] - fpr[lo])
    pro_end = np.append(pro_end, pro[lo] + share * (pro[hi] - pro[lo]))
    fpr_end = np.append(fpr_end, max_fpr)
  return fpr_end, pro_end


def aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
  """Normalised area under the per-region-overlap curve up to max_fpr.

  The trapezoidal area under `pro_curve` divided by max_fpr, so that a
  perfect map scores 1; see `pro_curve` for how regions and FPR are counted.

  Args:
    maps: anomaly maps, (H, W) or (N, H, W); higher means more anomalous.
    masks: same shape, truthy on anomalous pixels.
    max_fpr: upper end of the FPR range, in (0, 1].

  Raises:
    ValueError: on mismatched or non-image shapes, max_fpr outside (0, 1],
      or masks with no anomalous region or no normal pixel.
  """
  fpr, pro = pro_curve(maps, masks, max_fpr)
  return float(np.trapezoid(pro, fpr) / max_fpr)
