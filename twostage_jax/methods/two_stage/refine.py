"""Stage-1 map -> superpixel region -> stage-2 input, and the final map.

The refinement of the two-stage model (docs/methods.md, "Stage 2 and the final map"):

1. threshold the stage-1 map (`refine.threshold_rule`):
   'absolute': map >= threshold; 'relative': map >= threshold * the map's
   maximum over its image; 'tasad': the rule of the public code's
   `seg_module` on the 8-bit map (see `tasad_flags`);
2. 3x3 median filter of that binary map (`refine.median_size`), removing
   isolated pixels; for a binary map the median is the majority of the
   window; borders replicate the edge pixels;
3. keep every SLIC superpixel of the input image (labels computed on the
   host, see synthesis.slic_labels) that overlaps what survived by at least
   one pixel;
4. the stage-2 input is the image with everything outside those
   superpixels set to zero.

The final map combines the two stage maps (`refine.combine`): 'sum' (the
public code's choice), 'mean', 'max', or 'stage2' alone.

Everything here is a pure JAX function of device arrays: the SLIC labels
come with the batch, so the selection runs inside the jitted step, next to
the stage-1 forward pass that produces the map, without a round trip to the
host.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

THRESHOLD_RULES = ('absolute', 'relative', 'tasad')
_LEVELS = 256


def tasad_flags(maps: jax.Array, th_pix: float, th_val: float) -> jax.Array:
  """bool (B, H, W): the public TASAD code's flags (`seg_module`, `residual_th`).

  That code turns each map into 8-bit levels, floor(|map| * 255); drops every
  level whose pixel count exceeds th_pix times the count of the most frequent
  level (with th_pix < 1, the map's background level); then flags the
  survivors above th_val. It median-filters the 8-bit map before comparing
  with th_val, which for a 3x3 window equals the majority filter this module
  applies to the flags (the median of 9 values exceeds th_val exactly when 5
  of them do). It runs at test time with th_pix 0.95, th_val 30, in training
  with 1 and 0.

  Two departures, both fixes: levels above 255 saturate, where its uint8 cast
  of |map| * 255 is undefined beyond 255 (it wraps on common platforms, so a
  map value of 1.3 reads as level 75); and SLIC segments the image in its
  real layout, where that code reshapes the channel-first tensor to (H, W, 3)
  without transposing, segmenting scrambled pixels.
  """
  levels = jnp.floor(jnp.minimum(jnp.abs(maps) * (_LEVELS - 1), _LEVELS - 1)).astype(jnp.int32)
  flat = levels.reshape(levels.shape[0], -1)
  counts = jax.vmap(lambda x: jnp.bincount(x, length=_LEVELS))(flat)
  rare = counts <= th_pix * counts.max(axis=1, keepdims=True)
  kept = jnp.take_along_axis(rare, flat, axis=1).reshape(levels.shape)
  return kept & (levels > th_val)
COMBINE_RULES = ('sum', 'mean', 'max', 'stage2')
TRAIN_RULES = ('test', 'tasad')


def threshold(maps: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """bool (B, H, W): pixels of the stage-1 maps that count as flagged."""
  if config.threshold_rule == 'absolute':
    return maps >= config.threshold
  if config.threshold_rule == 'relative':
    peak = maps.max(axis=(1, 2), keepdims=True)
    return maps >= config.threshold * peak
  if config.threshold_rule == 'tasad':
    return tasad_flags(maps, config.tasad_th_pix, config.tasad_th_val)
  raise ValueError(f'unknown refine.threshold_rule {config.threshold_rule!r}; '
                   f'expected one of {THRESHOLD_RULES}')


def training_rule(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `refine` config that selects stage 2's training regions (`refine.train_rule`).

  'test': the rule used at test time. 'tasad': the public code's training
  rule, `tasad_flags` at `train_tasad_th_pix` and `train_tasad_th_val` (its 1
  and 0 flag every non-zero 8-bit level), so that a weak stage 1 still
  leaves the pseudo-anomaly in stage 2's input.
  """
  if config.train_rule == 'test':
    return config
  if config.train_rule == 'tasad':
    rule = config.copy_and_resolve_references()
    rule.threshold_rule = 'tasad'
    rule.tasad_th_pix = config.train_tasad_th_pix
    rule.tasad_th_val = config.train_tasad_th_val
    return rule
  raise ValueError(f'unknown refine.train_rule {config.train_rule!r}; '
                   f'expected one of {TRAIN_RULES}')


def binary_median(flags: jax.Array, size: int) -> jax.Array:
  """Median filter of bool (B, H, W) maps over size x size windows (size odd).

  The median of 0/1 values is 1 exactly when more than half of the window is
  1, so a windowed count replaces the sort. Edge pixels are replicated, as
  OpenCV's medianBlur does.
  """
  pad = size // 2
  padded = jnp.pad(flags.astype(jnp.int32), ((0, 0), (pad, pad), (pad, pad)), mode='edge')
  counts = jax.lax.reduce_window(padded, 0, jax.lax.add, (1, size, size), (1, 1, 1), 'VALID')
  return counts > (size * size) // 2


def _touched_segments(flags: jax.Array, labels: jax.Array) -> jax.Array:
  """bool (H, W): pixels whose superpixel holds at least one flagged pixel."""
  num_segments = labels.size  # ids are < H * W, whatever SLIC returned
  hit = jax.ops.segment_max(flags.ravel().astype(jnp.int32), labels.ravel(),
                            num_segments=num_segments)
  return hit[labels] > 0


def region(stage1_maps: jax.Array, labels: jax.Array,
           config: ml_collections.ConfigDict) -> jax.Array:
  """bool (B, H, W): union of the superpixels that stage 1 flagged.

  Args:
    stage1_maps: float (B, H, W) stage-1 anomaly maps.
    labels: int32 (B, H, W) SLIC ids (>= 0) of the input images.
    config: the `refine` section of the config.
  """
  flags = binary_median(threshold(stage1_maps, config), config.median_size)
  return jax.vmap(_touched_segments)(flags, labels)


def masked_input(images: jax.Array, selected: jax.Array) -> jax.Array:
  """The stage-2 input: the images, zero outside the selected region."""
  return images * selected[..., None].astype(images.dtype)


def combine(stage1_maps: jax.Array, stage2_maps: jax.Array,
            rule: str) -> jax.Array:
  """The final anomaly maps from the two stage maps (`refine.combine`)."""
  if rule == 'sum':
    return stage1_maps + stage2_maps
  if rule == 'mean':
    return (stage1_maps + stage2_maps) / 2
  if rule == 'max':
    return jnp.maximum(stage1_maps, stage2_maps)
  if rule == 'stage2':
    return stage2_maps
  raise ValueError(f'unknown refine.combine {rule!r}; expected one of {COMBINE_RULES}')


def stage2_batch(stage1_apply: Callable[..., jax.Array], stage1_variables: Any,
                 batch: dict[str, jax.Array],
                 config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  """Turns a training batch with SLIC labels into stage 2's batch.

  Stage 1 is frozen: it runs in inference mode (BatchNorm running
  statistics) and no gradient flows into it. The region follows
  `refine.train_rule` (`training_rule`).

  Args:
    stage1_apply: the stage-1 module's `apply`.
    stage1_variables: its params and batch statistics.
    batch: 'image' float (B, H, W, 3), 'mask' (B, H, W), 'labels' int32 (B, H, W).
    config: the `refine` section of the config.

  Returns:
    {'image': the masked images, 'mask': the unchanged targets}.
  """
  maps = jax.lax.stop_gradient(stage1_apply(stage1_variables, batch['image'], train=False))
  selected = region(maps, batch['labels'], training_rule(config))
  return {'image': masked_input(batch['image'], selected), 'mask': batch['mask']}
