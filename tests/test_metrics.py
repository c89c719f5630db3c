"""AUROC against its definition: the share of (anomalous, normal) pairs ranked right."""

import itertools

import numpy as np
import pytest

from twostage_jax import metrics


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
