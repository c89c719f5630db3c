"""Bauer's self-supervised autoencoder with the masked contrast objective.

A convolutional autoencoder with stacked dilated convolutions is trained on
normal images with a random patch elastically distorted, to reproduce the
normal image; the anomaly map is its Gaussian-smoothed reconstruction error.
Objective 3 (default) keeps the output faithful on unmodified pixels and
pushes it away from the input where it was modified; objective 1 inpaints
the modified pixels instead (`loss.objective`).

  python main.py --config=configs/bauer.py --workdir=runs/bauer_grid \
      --config.data_dir=/data/mvtec_ad --config.category=grid
"""

import ml_collections

from configs import base

# Rotations and flips that keep a category's normal appearance normal:
# textures take all of them, objects that are symmetric under some of them
# take those. Categories not listed get `augment` (no augmentation).
_ALL_ROTATIONS = (0, 90, 180, 270)
_CATEGORY_AUGMENT = {
    'carpet': (_ALL_ROTATIONS, True, True),
    'grid': (_ALL_ROTATIONS, True, True),
    'leather': (_ALL_ROTATIONS, True, True),
    'tile': (_ALL_ROTATIONS, True, True),
    'wood': ((0, 180), True, True),
    'bottle': (_ALL_ROTATIONS, True, True),
    'hazelnut': (_ALL_ROTATIONS, False, False),
    'metal_nut': (_ALL_ROTATIONS, False, False),
    'screw': (_ALL_ROTATIONS, False, False),
    'weave': (_ALL_ROTATIONS, True, True),  # the built-in demo texture
}


def get_config() -> ml_collections.ConfigDict:
  config = base.get_config(num_stages=1)
  config.method = 'bauer'
  config.stage = '1'  # a single network
  config.category = 'grid'
  config.image_size = 256  # the paper uses 512
  config.model.encoder_widths = (32, 64, 128)
  config.model.sdc_blocks = 4
  config.model.sdc_filters = 64
  config.model.sdc_dilations = (1, 2, 4, 8, 16)
  config.model.sdc_kernel = 5
  config.model.bn_momentum = 0.9
  config.model.bn_epsilon = 1e-5

  config.loss = ml_collections.ConfigDict()
  config.loss.objective = 3  # 1: inpaint the modified pixels; 3: contrast them
  config.loss.lam = 0.5  # weight of the unmodified-pixel term

  # Every training sample gets one distorted patch.
  config.distortion = base.patch_distortion()

  for category, (rotations, hflip, vflip) in _CATEGORY_AUGMENT.items():
    config.augment_by_category[category] = ml_collections.ConfigDict(
        {'rotations': rotations, 'hflip': hflip, 'vflip': vflip})

  # Anomaly map: absolute reconstruction error |F(X) - X| averaged over the channels,
  # Gaussian-smoothed with this sigma (pixels at image_size).
  config.eval.map_sigma = 4.0
  config.eval.score_rule = 'max'
  # Bauer's protocol: defects smaller than this share of the image are not
  # flagged; the map threshold keeps every held-out normal image's largest
  # thresholded component below it. Per-category values override it.
  config.eval.min_defect_fraction = 0.001
  config.eval.min_defect_fraction_by_category = ml_collections.ConfigDict()
  return config
