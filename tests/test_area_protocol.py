"""Bauer's minimum-area protocol on hand-built maps."""

import numpy as np
import pytest

from twostage_jax.methods.bauer import area_protocol


def blob_map(size=16, blobs=()):
  """A map of zeros with square blobs (row, col, side, value)."""
  out = np.zeros((size, size), np.float32)
  for row, col, side, value in blobs:
    out[row:row + side, col:col + side] = value
  return out


def test_largest_component_counts_8_connected_pixels():
  flags = blob_map(blobs=[(0, 0, 3, 1.0), (5, 5, 2, 1.0)])
  flags[3, 3] = 1.0  # touches the 3x3 square diagonally only
  assert area_protocol.largest_component(flags[None], 0.5).tolist() == [10]
  assert area_protocol.largest_component(flags[None], 2.0).tolist() == [0]


def test_threshold_keeps_every_normal_blob_just_below_the_area():
  # Normal image 1: a 3x3 blob at 0.6 (9 px) on a 2x2 core at 0.9 (4 px);
  # normal image 2: a 2x3 blob at 0.7 (6 px).
  first = blob_map(blobs=[(2, 2, 3, 0.6), (2, 2, 2, 0.9)])
  second = blob_map(blobs=[(8, 8, 2, 0.7)])
  second[8:10, 10] = 0.7
  normals = np.stack([first, second])
  # The candidates are the maps' values 0, 0.6, 0.7, 0.9. min_area 5: at 0.6
  # image 1 has 9 px, at 0.7 image 2 has 6 px, at 0.9 the largest is image
  # 1's 4-px core. min_area 10: at 0 every pixel is flagged; at 0.6, 9 px.
  assert area_protocol.area_threshold(normals, 5) == np.float32(0.9)
  assert area_protocol.area_threshold(normals, 10) == np.float32(0.6)
  assert area_protocol.area_threshold(normals, 1) > np.float32(0.9)  # nothing may be flagged


def test_protocol_figures_on_a_constructed_test_set():
  threshold, min_area = 0.5, 4
  maps = np.stack([
      blob_map(blobs=[(0, 0, 3, 1.0)]),  # defect, found (9 px)
      blob_map(blobs=[(0, 0, 1, 1.0)]),  # defect, only a 1-px component: missed
      blob_map(),  # normal, clean
      blob_map(blobs=[(4, 4, 2, 1.0)]),  # normal, a 4-px component: false alarm
  ])
  masks = np.zeros_like(maps, bool)
  masks[0, 0:3, 0:4] = True  # 12 px, 9 of them found
  masks[1, 0:2, 0:2] = True
  labels = np.array([1, 1, 0, 0])
  got = area_protocol.evaluate_at_area_threshold(maps, masks, labels, threshold, min_area)
  assert got['tpr'] == 0.5 and got['tnr'] == 0.5 and got['mean_tpr_tnr'] == 0.5
  assert got['image_f1'] == pytest.approx(2 * 1 / (2 + 2))  # TP 1, predicted 2, actual 2
  # Predicted pixels: 9 (image 0) + 4 (image 3); actual 12 + 4; TP 9.
  assert got['pixel_f1'] == pytest.approx(2 * 9 / (13 + 16))


def test_bad_inputs_are_named():
  with pytest.raises(ValueError, match='min_area must be at least 1'):
    area_protocol.area_threshold(np.zeros((1, 4, 4)), 0)
  with pytest.raises(ValueError, match=r'need \(N, H, W\) normal maps'):
    area_protocol.area_threshold(np.zeros((4, 4)), 3)
  with pytest.raises(ValueError, match='both normal and defective'):
    area_protocol.evaluate_at_area_threshold(
        np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), np.array([1, 1]), 0.5, 2)
