"""Map post-processing puts no prior on where defects lie; the baseline rows show it.

A constant map through the smoothing and score rule must score AUROC 0.5
exactly, and maps of noise must stay within what chance allows, whatever the
masks; the zero-padded smoothing these tests replaced fails both (the
yardsticks below).
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from configs import mvtec_cpu
from twostage_jax import data
from twostage_jax import losses
from twostage_jax import methods
from twostage_jax.evaluation import baselines
from twostage_jax.evaluation import metrics
from twostage_jax.evaluation import report
from twostage_jax.inference import engine

MVTEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'data',
                     'mvtec_ad')
SIZE = 64
SIGMA = 4.0


def central_masks(count: int, size: int, seed: int) -> np.ndarray:
  """(count, size, size) masks: every other image has an ellipse in the middle half."""
  rng = np.random.default_rng(seed)
  rows, columns = np.mgrid[:size, :size]
  masks = np.zeros((count, size, size), bool)
  for mask in masks[1::2]:
    centre = rng.uniform(size / 4, 3 * size / 4, 2)
    radii = rng.uniform(size / 16, size / 6, 2)
    mask[...] = ((rows - centre[0]) / radii[0]) ** 2 + ((columns - centre[1]) / radii[1]) ** 2 < 1
  return masks


def two_stage_model() -> engine.TrainedModel:
  """A trained two-stage model's description; the baseline rows run none of its networks."""
  return engine.TrainedModel(methods.get('two_stage'), (None, None), (1, 1), 'combined')


def zero_padded(maps: np.ndarray, sigma: float) -> np.ndarray:
  """The smoothing these tests replaced: the same Gaussian, zeros outside the map."""
  window = 2 * int(np.ceil(3 * sigma)) + 1
  return np.asarray(losses.gaussian_filter_same(window, sigma)(jnp.asarray(maps)[..., None]))[
      ..., 0]


@pytest.mark.parametrize('shape,sigma', [((2, 23, 17), 1.5), ((1, 64, 64), 4.0),
                                         ((1, 9, 30), 4.0)])
def test_smoothing_reflects_the_borders_as_scipy_does(shape, sigma):
  maps = np.random.default_rng(0).random(shape, np.float32)
  radius = int(np.ceil(3 * sigma))
  expected = scipy.ndimage.gaussian_filter(maps.astype(np.float64), (0, sigma, sigma),
                                           mode='reflect', truncate=radius / sigma)
  # Each output is the map plus 2 x 2 radius float32 products and sums of
  # values below 1: at most 8 radius roundings of 2^-24 (the 9-pixel side
  # reflects more than once, as scipy does).
  atol = 8 * radius * 2.0 ** -24
  np.testing.assert_allclose(engine.smooth(jnp.asarray(maps), sigma), expected,
                             rtol=0, atol=atol)


@pytest.mark.parametrize('value', [0.0, 0.37, 1.0, 123.456])
@pytest.mark.parametrize('sigma', [0.5, 4.0, 10.0])
def test_smoothing_keeps_a_constant_map_exactly_constant(value, sigma):
  maps = np.full((2, 48, 40), value, np.float32)
  np.testing.assert_array_equal(engine.smooth(jnp.asarray(maps), sigma), maps)


def test_a_constant_map_scores_one_half_on_central_masks():
  config = mvtec_cpu.get_config()
  config.eval.map_sigma = SIGMA
  masks = central_masks(40, SIZE, seed=0)
  maps, scores = baselines.constant_maps(config, two_stage_model(), len(masks))
  assert metrics.auroc(maps, masks) == 0.5
  assert metrics.auroc(scores, masks.any(axis=(1, 2))) == 0.5
  # Yardstick: zero padding lowers the border, which masks in the middle reward.
  assert metrics.auroc(zero_padded(np.full(masks.shape, 0.5, np.float32), SIGMA), masks) > 0.7


@pytest.mark.skipif(not os.path.isdir(os.path.join(MVTEC, 'bottle')),
                    reason='the shared MVTec AD data is not here')
def test_a_constant_map_scores_one_half_on_bottles_real_masks():
  config = mvtec_cpu.get_config()
  config.data_dir, config.category, config.image_size = MVTEC, 'bottle', SIZE
  test = data.category_test_set(config)
  maps, scores = baselines.constant_maps(config, two_stage_model(), len(test.images))
  assert metrics.auroc(maps, test.masks) == 0.5
  assert metrics.auroc(scores, test.labels) == 0.5
  # Yardstick: the zero-padded smoothing scored 0.79 here.
  assert metrics.auroc(zero_padded(np.full(maps.shape, 0.5, np.float32), SIGMA),
                       test.masks) > 0.7


def reflect_covariance(size: int, sigma: float) -> np.ndarray:
  """(size, size) K K^T of the 1-D reflected smoothing K (scipy's, built independently)."""
  radius = int(np.ceil(3 * sigma))
  k = scipy.ndimage.gaussian_filter1d(np.eye(size), sigma, axis=0, mode='reflect',
                                      truncate=radius / sigma)
  return k @ k.T


def null_auroc_deviation_bound(masks: np.ndarray, sigma: float) -> float:
  """5 standard deviations of the pixel AUROC of smoothed i.i.d. noise, bounded from above.

  AUROC - 1/2 is, to first order (Hoeffding), the mean over anomalous pixels
  of G(X) minus the mean over normal pixels of F(X), with F and G the
  other class's distribution functions: terms in [0, 1], so of variance at
  most 1/4. Smoothing correlates them: the variance of a mean over a set P
  is at most 1/4 * sum_{i,j in P} rho_ij / |P|^2, where the correlation of
  the transformed values is at most that of the near-Gaussian smoothed
  values, rho_ij = C_ij / sqrt(C_ii C_jj); C, the covariance of one map,
  is the Kronecker product of the 1-D reflected smoothing's K K^T for rows
  and columns. Images are independent. The
  second-order term of the U statistic is the 1 / sqrt(n_P n_Q) of the
  effective counts. By symmetry (u -> 1 - u maps AUROC to 1 - AUROC) the
  expectation is exactly 1/2.
  """
  rows_cov = reflect_covariance(masks.shape[1], sigma)
  columns_cov = reflect_covariance(masks.shape[2], sigma)
  # rho = C / sqrt(diag C diag C^T); diag C = diag(rows) x diag(columns).
  scale = 1 / np.sqrt(np.outer(np.diag(rows_cov), np.diag(columns_cov)))

  def correlation_sum(selected: np.ndarray) -> float:
    v = selected * scale
    return float(np.sum((rows_cov @ v @ columns_cov) * v))

  spread = []
  for selected in (masks, ~masks):
    total = correlation_sum(selected.astype(np.float64))
    count = selected.sum()
    spread.append((np.sqrt(0.25 * total) / count, count ** 2 / total))
  (sd_p, n_p), (sd_q, n_q) = spread
  return 5 * (sd_p + sd_q + np.sqrt(0.25 / (n_p * n_q)))


def test_noise_maps_score_within_chance_of_one_half():
  config = mvtec_cpu.get_config()
  config.eval.map_sigma = SIGMA
  masks = central_masks(384, SIZE, seed=1)
  noise = np.random.default_rng(2).random(masks.shape, np.float32)
  maps = np.asarray(engine.smooth(jnp.asarray(noise), SIGMA))
  bound = null_auroc_deviation_bound(masks, SIGMA)
  assert bound < 0.2  # the test says something
  assert abs(metrics.auroc(maps, masks) - 0.5) < bound
  # Image scores of independent maps: the Mann-Whitney null variance, exactly.
  labels = masks.any(axis=(1, 2))
  positives, negatives = labels.sum(), (~labels).sum()
  image_sd = np.sqrt((positives + negatives + 1) / (12 * positives * negatives))
  scores = engine.image_scores(config, {'noise': maps})['noise']
  assert abs(metrics.auroc(scores, labels) - 0.5) < 5 * image_sd
  # Yardstick: the zero-padded smoothing of the same noise is outside the bound.
  assert metrics.auroc(zero_padded(noise, SIGMA), masks) - 0.5 > bound


def test_the_papers_score_rule_scores_a_defect_the_same_at_every_position():
  """On non-negative maps no window reaching outside the image beats one wholly inside."""
  config = mvtec_cpu.get_config()
  size, side = 40, 7
  maps = []
  for top in range(size - side + 1):
    for left in range(0, size - side + 1, 3):
      m = np.full((size, size), 0.1, np.float32)
      m[top:top + side, left:left + side] = 0.8
      maps.append(m)
  scores = engine.image_scores(config, {'blob': np.stack(maps)})['blob']
  window = config.eval.score_filter_size
  inside = (0.1 * (window ** 2 - side ** 2) + 0.8 * side ** 2) / window ** 2
  # A sum of window^2 = 441 float32 terms: within 441 * 2^-24 of the exact mean.
  np.testing.assert_allclose(scores, inside, rtol=0, atol=window ** 2 * 2.0 ** -24)


def test_flagged_rows_are_near_chance_or_not_above_position_only():
  def row(pixel, image):
    return {'pixel_auroc': pixel, 'image_auroc': image}

  references = {report.BASELINE: row(0.5, 0.5), report.POSITION_ONLY: row(0.75, 0.5)}
  rows = {'good': row(0.9, 0.9), 'prior': row(0.75, 0.9), 'chance': row(0.95, 0.54)}
  flags = report.flagged_rows(rows, references)
  assert set(flags) == {'prior', 'chance'}
  assert 'not above position only (0.7500)' in flags['prior']
  assert 'image AUROC 0.5400 below 0.55' in flags['chance']
  # Without held-out images there is no position-only row: only the floor applies.
  assert set(report.flagged_rows(rows, {report.BASELINE: row(0.5, 0.5)})) == {'chance'}
