"""Metrics against their definitions, scikit-learn, brute force and hand-derived values."""

import itertools

import numpy as np
import pytest
import scipy.ndimage

from twostage_jax.evaluation import metrics


def pairwise_auroc(scores, labels):
  pos = [s for s, l in zip(scores, labels) if l]
  neg = [s for s, l in zip(scores, labels) if not l]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


@pytest.mark.parametrize('seed', range(4))
def test_auroc_equals_pairwise_definition_with_ties(seed):
  rng = np.random.default_rng(seed)
  labels = rng.random(200) < 0.3
  scores = np.round(rng.random(200) + 0.3 * labels, 1)  # rounding makes ties
  assert metrics.auroc(scores, labels) == pytest.approx(pairwise_auroc(scores, labels), abs=1e-12)


def test_auroc_perfect_inverted_and_constant():
  labels = np.array([0, 0, 1, 1, 0, 1])
  assert metrics.auroc(labels * 2.0, labels) == 1.0
  assert metrics.auroc(-labels * 2.0, labels) == 0.0
  assert metrics.auroc(np.ones(6), labels) == 0.5


def test_auroc_pools_maps_of_any_shape():
  rng = np.random.default_rng(0)
  masks = rng.random((3, 8, 8)) < 0.2
  maps = rng.random((3, 8, 8)) + masks
  assert metrics.auroc(maps, masks) == pytest.approx(pairwise_auroc(maps.ravel(), masks.ravel()))


def test_auroc_rejects_one_class_and_mismatched_shapes():
  with pytest.raises(ValueError, match='needs both normal and anomalous'):
    metrics.auroc(np.arange(4.0), np.zeros(4))
  with pytest.raises(ValueError, match='5 scores but 4 labels'):
    metrics.auroc(np.arange(5.0), np.array([0, 1, 0, 1]))


def tied_scores(seed, n=300):
  rng = np.random.default_rng(seed)
  labels = rng.random(n) < 0.3
  return np.round(rng.random(n) + 0.3 * labels, 1), labels  # rounding makes ties


@pytest.mark.parametrize('seed', range(5))
def test_ap_and_auroc_equal_sklearn_with_ties(seed):
  sk_metrics = pytest.importorskip('sklearn.metrics')
  scores, labels = tied_scores(seed)
  assert metrics.average_precision(scores, labels) == pytest.approx(
      sk_metrics.average_precision_score(labels, scores), abs=1e-9)
  assert metrics.auroc(scores, labels) == pytest.approx(
      sk_metrics.roc_auc_score(labels, scores), abs=1e-9)


def brute_force_max(scores, labels, score_fn):
  """Best score_fn(tp, fp, fn) over every threshold t in the scores, by loop."""
  best = (-1.0, None)
  for t in np.unique(scores):
    predicted = scores >= t
    tp = np.sum(predicted & labels)
    fp = np.sum(predicted & ~labels)
    fn = np.sum(~predicted & labels)
    best = max(best, (score_fn(tp, fp, fn), t), key=lambda b: b[0])
  return best


def f1_of(tp, fp, fn):
  return 2 * tp / (2 * tp + fp + fn)


def iou_of(tp, fp, fn):
  return tp / (tp + fp + fn)


@pytest.mark.parametrize('seed', range(4))
def test_f1_max_equals_brute_force(seed):
  scores, labels = tied_scores(seed, n=80)
  value, threshold = metrics.f1_max(scores, labels)
  assert value == pytest.approx(brute_force_max(scores, labels, f1_of)[0], abs=1e-12)
  predicted = scores >= threshold
  assert f1_of(np.sum(predicted & labels), np.sum(predicted & ~labels),
               np.sum(~predicted & labels)) == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize('seed', range(4))
def test_iou_max_equals_brute_force(seed):
  rng = np.random.default_rng(seed)
  masks = rng.random((2, 6, 6)) < 0.3
  maps = np.round(rng.random((2, 6, 6)) + 0.4 * masks, 1)
  value, threshold = metrics.iou_max(maps, masks)
  assert value == pytest.approx(brute_force_max(maps, masks, iou_of)[0], abs=1e-12)
  predicted = maps >= threshold
  assert iou_of(np.sum(predicted & masks), np.sum(predicted & ~masks),
                np.sum(~predicted & masks)) == pytest.approx(value, abs=1e-12)


def test_f1_and_iou_pick_the_separating_threshold():
  labels = np.array([0, 0, 1, 1, 0, 1])
  assert metrics.f1_max(labels * 2.0, labels) == (1.0, 2.0)
  assert metrics.iou_max(labels * 2.0, labels) == (1.0, 2.0)


def one_image(region=(slice(2, 4), slice(2, 4))):
  """An 8x8 mask with one 2x2 region, and an all-zero map to paint on."""
  mask = np.zeros((8, 8), bool)
  mask[region] = True
  return np.zeros((8, 8)), mask


def test_aupro_region_fully_found_is_one():
  # Curve (0, 0) -> (0, 1) at t=1 -> (1, 1) at t=0: PRO is 1 on all of [0, 0.3].
  anomaly_map, mask = one_image()
  anomaly_map[mask] = 1.0
  assert metrics.aupro(anomaly_map, mask) == 1.0


def test_aupro_half_of_region_found():
  # Two of the four region pixels score 1, everything else 0.
  # t=1: no normal pixel is positive and half the region is: point (0, 0.5).
  # t=0: every pixel is positive: point (1, 1). On the segment between them
  # PRO = 0.5 + 0.5 * FPR, so PRO(0.3) = 0.65, and the area on [0, 0.3] is a
  # trapezoid of height 0.3 and parallel sides 0.5 and 0.65.
  anomaly_map, mask = one_image()
  anomaly_map[2, 2:4] = 1.0
  expected = (0.5 + 0.65) / 2 * 0.3 / 0.3
  assert expected == pytest.approx(0.575)
  assert metrics.aupro(anomaly_map, mask) == pytest.approx(expected, abs=1e-12)


def test_aupro_false_positive_blob_only():
  # A 2x3 blob of 6 normal pixels scores 1; the region and the rest score 0.
  # Normal pixels: 64 - 4 = 60. t=1: point (6/60, 0) = (0.1, 0). t=0: (1, 1).
  # On [0.1, 1] PRO rises linearly from 0 to 1: PRO(0.3) = 0.2 / 0.9. The area
  # on [0, 0.3] is the triangle with base 0.3 - 0.1 and height PRO(0.3).
  anomaly_map, mask = one_image()
  anomaly_map[5:7, 4:7] = 1.0
  pro_at_end = (0.3 - 0.1) / (1 - 0.1)
  expected = 0.5 * (0.3 - 0.1) * pro_at_end / 0.3
  assert metrics.aupro(anomaly_map, mask) == pytest.approx(expected, abs=1e-12)


def test_aupro_regions_are_8_connected_within_each_image():
  # Pixels (0,0), (1,1), (1,2) touch diagonally: one region of 3 under
  # 8-connectivity (two regions, PRO 0.5, under 4-connectivity). Hitting (0,0)
  # gives the curve (0, 0) -> (0, 1/3) -> (1, 1), so PRO(0.3) = 1/3 + 2/3 * 0.3
  # and the value is the mean of the trapezoid's parallel sides.
  anomaly_map, mask = np.zeros((5, 5)), np.zeros((5, 5), bool)
  mask[0, 0] = mask[1, 1] = mask[1, 2] = True
  anomaly_map[0, 0] = 1.0
  expected = (1 / 3 + (1 / 3 + 2 / 3 * 0.3)) / 2
  assert metrics.aupro(anomaly_map, mask) == pytest.approx(expected, abs=1e-12)
  # The same pixel in two stacked images is two regions: the 1-pixel one in
  # image 0 is found, the 2-pixel one in image 1 is not, so the mean PRO is
  # 0.5 at FPR 0 (1/3 if they merged) and the value is as in the half case.
  masks = np.zeros((2, 4, 4), bool)
  masks[0, 1, 1] = masks[1, 1, 1] = masks[1, 1, 2] = True
  maps = np.zeros((2, 4, 4))
  maps[0, 1, 1] = 1.0
  assert metrics.aupro(maps, masks) == pytest.approx(0.575, abs=1e-12)


def per_image_regions(masks):
  """Boolean masks of the 8-connected regions of each image, image by image."""
  regions = []
  for mask in masks:
    labelled, count = scipy.ndimage.label(mask, np.ones((3, 3)))
    regions.append([labelled == r for r in range(1, count + 1)])
  return regions


def brute_force_aupro(maps, masks, max_fpr):
  """PRO curve by a loop over thresholds and regions, integrated by a loop."""
  regions = per_image_regions(masks)
  curve = [(0.0, 0.0)]
  for t in np.unique(maps)[::-1]:
    predicted = maps >= t
    fpr = np.sum(predicted & ~masks) / np.sum(~masks)
    pro = np.mean([np.sum(p & r) / np.sum(r)
                   for p, image_regions in zip(predicted, regions) for r in image_regions])
    curve.append((fpr, pro))
  area = 0.0
  for (x0, y0), (x1, y1) in zip(curve[:-1], curve[1:]):
    if x0 >= max_fpr:
      break
    if x1 > max_fpr:
      y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
      x1 = max_fpr
    area += (y0 + y1) / 2 * (x1 - x0)
  return area / max_fpr


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('max_fpr', [0.05, 0.3, 1.0])
def test_aupro_equals_brute_force_with_ties(seed, max_fpr):
  rng = np.random.default_rng(seed)
  masks = scipy.ndimage.binary_dilation(rng.random((3, 10, 10)) < 0.05, np.ones((1, 2, 2)))
  maps = np.round(rng.random((3, 10, 10)) + 0.5 * masks, 1)
  assert metrics.aupro(maps, masks, max_fpr) == pytest.approx(
      brute_force_aupro(maps, masks, max_fpr), abs=1e-12)


def test_perfect_and_inverted_maps():
  rng = np.random.default_rng(0)
  masks = np.zeros((2, 16, 16), bool)
  masks[0, 2:5, 3:9] = masks[1, 10:12, 1:3] = masks[1, 0, 15] = True
  maps = np.where(masks, 1 + rng.random(masks.shape), rng.random(masks.shape))
  assert metrics.auroc(maps, masks) == 1.0
  assert metrics.auroc(-maps, masks) == 0.0
  assert metrics.average_precision(maps, masks) == 1.0
  assert metrics.f1_max(maps, masks)[0] == 1.0
  assert metrics.iou_max(maps, masks)[0] == 1.0
  assert metrics.aupro(maps, masks) == pytest.approx(1.0, abs=1e-12)


def test_new_metrics_reject_bad_input():
  normal = np.zeros((4, 4), bool)
  for metric in metrics.average_precision, metrics.f1_max, metrics.iou_max:
    with pytest.raises(ValueError, match='needs at least one anomalous sample'):
      metric(np.arange(16.0).reshape(4, 4), normal)
    with pytest.raises(ValueError, match=r'of shape \(4, 4\) but .* of shape \(16,\)'):
      metric(np.zeros((4, 4)), normal.ravel())
  with pytest.raises(ValueError, match='at least one anomalous region'):
    metrics.aupro(np.zeros((4, 4)), normal)
  with pytest.raises(ValueError, match='at least one normal pixel'):
    metrics.aupro(np.zeros((4, 4)), ~normal)
  with pytest.raises(ValueError, match=r'maps of shape \(4, 4\) but masks of shape \(3, 4\)'):
    metrics.aupro(np.zeros((4, 4)), normal[:3])
  with pytest.raises(ValueError, match=r'\(H, W\) or \(N, H, W\)'):
    metrics.aupro(np.zeros(16), normal.ravel())
  with pytest.raises(ValueError, match=r'max_fpr must lie in \(0, 1\]'):
    metrics.aupro(np.zeros((4, 4)), ~normal, max_fpr=0)


@pytest.mark.parametrize('seed', range(4))
def test_roc_curve_equals_sklearn_points_with_ties(seed):
  sk_metrics = pytest.importorskip('sklearn.metrics')
  scores, labels = tied_scores(seed)
  fpr, tpr = metrics.roc_curve(scores, labels)
  sk_fpr, sk_tpr, _ = sk_metrics.roc_curve(labels, scores, drop_intermediate=False)
  # scikit-learn prepends (0, 0) at threshold inf; add it if a version does not.
  if sk_fpr[0] != 0 or sk_tpr[0] != 0:
    sk_fpr, sk_tpr = np.append(0.0, sk_fpr), np.append(0.0, sk_tpr)
  np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
  np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
  assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
  assert len(fpr) == len(np.unique(scores)) + 1
  assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auroc(scores, labels), abs=1e-12)


def test_roc_curve_rejects_one_class_and_mismatched_shapes():
  with pytest.raises(ValueError, match='needs both normal and anomalous.*0 anomalous and 4 normal'):
    metrics.roc_curve(np.arange(4.0), np.zeros(4))
  with pytest.raises(ValueError, match='4 anomalous and 0 normal'):
    metrics.roc_curve(np.arange(4.0), np.ones(4))
  with pytest.raises(ValueError, match=r'of shape \(5,\) but .* of shape \(4,\)'):
    metrics.roc_curve(np.arange(5.0), np.array([0, 1, 0, 1]))


def test_pro_curve_of_half_found_region_by_hand():
  # As in test_aupro_half_of_region_found: (0, 0) -> (0, 0.5) at t=1, then
  # interpolated to PRO 0.65 at FPR 0.3 (the next point, (1, 1), lies beyond).
  anomaly_map, mask = one_image()
  anomaly_map[2, 2:4] = 1.0
  fpr, pro = metrics.pro_curve(anomaly_map, mask)
  np.testing.assert_allclose(fpr, [0.0, 0.0, 0.3], atol=1e-12)
  np.testing.assert_allclose(pro, [0.0, 0.5, 0.65], atol=1e-12)


@pytest.mark.parametrize('seed', range(3))
@pytest.mark.parametrize('max_fpr', [0.05, 0.3, 1.0])
def test_pro_curve_ends_at_max_fpr_and_integrates_to_aupro(seed, max_fpr):
  rng = np.random.default_rng(seed)
  masks = scipy.ndimage.binary_dilation(rng.random((3, 10, 10)) < 0.05, np.ones((1, 2, 2)))
  maps = np.round(rng.random((3, 10, 10)) + 0.5 * masks, 1)
  fpr, pro = metrics.pro_curve(maps, masks, max_fpr)
  assert (fpr[0], pro[0]) == (0.0, 0.0)
  assert fpr[-1] == max_fpr
  assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= 0)
  assert np.all(fpr <= max_fpr)
  assert np.trapezoid(pro, fpr) / max_fpr == metrics.aupro(maps, masks, max_fpr)
  assert metrics.aupro(maps, masks, max_fpr) == pytest.approx(
      brute_force_aupro(maps, masks, max_fpr), abs=1e-12)


def test_pro_curve_reaching_max_fpr_exactly_is_not_interpolated():
  # 6 of 60 normal pixels score 1: the point (0.1, 0) lies exactly at max_fpr.
  anomaly_map, mask = one_image()
  anomaly_map[5:7, 4:7] = 1.0
  fpr, pro = metrics.pro_curve(anomaly_map, mask, max_fpr=0.1)
  np.testing.assert_allclose(fpr, [0.0, 0.1], atol=1e-15)
  np.testing.assert_allclose(pro, [0.0, 0.0])


def test_pro_curve_keeps_aupro_validation():
  normal = np.zeros((4, 4), bool)
  with pytest.raises(ValueError, match='at least one anomalous region'):
    metrics.pro_curve(np.zeros((4, 4)), normal)
  with pytest.raises(ValueError, match=r'max_fpr must lie in \(0, 1\]'):
    metrics.pro_curve(np.zeros((4, 4)), ~normal, max_fpr=1.5)
