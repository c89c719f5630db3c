"""The refinement on the host, in NumPy and scikit-image, for exports without it.

An ONNX export of the two-stage model is two graphs, because its device
SLIC (while loops) has no ONNX form; between them the caller computes, for
each image and its stage-1 map from the first graph:

1. SLIC labels of the uint8 RGB image: scikit-image's
   `slic(image, n_segments, compactness, sigma, start_label=0, channel_axis=-1)`;
2. the flagged pixels of the stage-1 map by `threshold_rule`:
   'absolute': map >= threshold; 'relative': map >= threshold * max(map);
   'tasad': with levels = floor(min(|map| * 255, 255)), the pixels whose
   level is above `tasad_th_val` and holds at most `tasad_th_pix` times the
   pixel count of the image's most frequent level;
3. their majority over `median_size` x `median_size` windows (more than half
   of the window flagged), borders replicated;
4. the region: every pixel whose superpixel holds a flagged pixel, as
   float32 0/1, the second graph's input 'region'.

It computes what refine.region computes on the device (tested equal on the
same labels). This module imports neither JAX nor anything that does.
"""

from typing import Any

import numpy as np

from twostage_jax.synthesis import superpixel

_LEVELS = 256


def _flags(maps: np.ndarray, settings: dict[str, Any]) -> np.ndarray:
  """bool (B, H, W): step 2, in float32 as on the device."""
  rule = settings['threshold_rule']
  if rule == 'absolute':
    return maps >= np.float32(settings['threshold'])
  if rule == 'relative':
    return maps >= np.float32(settings['threshold']) * maps.max(axis=(1, 2), keepdims=True)
  levels = np.floor(np.minimum(np.abs(maps) * np.float32(_LEVELS - 1),
                               np.float32(_LEVELS - 1))).astype(np.int32)
  flat = levels.reshape(len(levels), -1)
  counts = np.stack([np.bincount(row, minlength=_LEVELS) for row in flat])
  limit = np.float32(settings['tasad_th_pix']) * counts.max(axis=1, keepdims=True).astype(
      np.float32)
  rare = counts <= limit
  kept = np.take_along_axis(rare, flat, axis=1).reshape(levels.shape)
  return kept & (levels > settings['tasad_th_val'])


def _majority(flags: np.ndarray, size: int) -> np.ndarray:
  """Step 3: more than half of each size x size window, borders replicated."""
  pad = size // 2
  padded = np.pad(flags.astype(np.int32), ((0, 0), (pad, pad), (pad, pad)), mode='edge')
  height, width = flags.shape[1:]
  counts = sum(padded[:, i:i + height, j:j + width] for i in range(size) for j in range(size))
  return counts > (size * size) // 2


def region(images: np.ndarray, stage1_maps: np.ndarray, settings: dict[str, Any]
           ) -> np.ndarray:
  """float32 (B, H, W) 0/1 region of uint8 (B, H, W, 3) images and their stage-1 maps.

  `settings`: the run's `refine` section (threshold_rule, threshold,
  tasad_th_pix, tasad_th_val, median_size, n_segments, compactness, sigma).
  """
  flags = _majority(_flags(np.asarray(stage1_maps, np.float32), settings),
                    settings['median_size'])
  out = np.zeros(flags.shape, np.float32)
  for i, (image, image_flags) in enumerate(zip(images, flags)):
    labels = superpixel.slic_labels(image, settings['n_segments'], settings['compactness'],
                                    settings['sigma'])
    touched = np.zeros(labels.max() + 1, bool)
    touched[labels[image_flags]] = True
    out[i] = touched[labels]
  return out
