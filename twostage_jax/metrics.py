"""Threshold-free detection metrics, vectorised over all scores at once."""

import numpy as np
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
