"""Held-out normal images: a fixed share of train/good kept out of training.

They calibrate the decision thresholds of prediction (see inference/calibration.py),
so those thresholds never see the test set. The split depends only on the
number of images, the fraction and the seed, so training and calibration,
run at different times, agree on it.
"""

import ml_collections
import numpy as np

from twostage_jax.data import resolve


def split_holdout(num_images: int, fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Sorted indices (training, held out) of `num_images` training images.

  round(fraction * num_images) images are held out, at least one when
  fraction > 0 and never all of them.

  Raises:
    ValueError: if fraction is outside [0, 1) or too few images remain.
  """
  if not 0 <= fraction < 1:
    raise ValueError(f'holdout fraction must lie in [0, 1), got {fraction}')
  count = 0 if fraction == 0 else max(1, round(fraction * num_images))
  if count >= num_images:
    raise ValueError(
        f'holding out {count} of {num_images} training images leaves none to '
        'train on; lower calibration.holdout_fraction or add images')
  order = np.random.default_rng([seed, num_images]).permutation(num_images)
  return np.sort(order[count:]), np.sort(order[:count])


def training_images(config: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
  """uint8 (training, held-out) normal images of the configured category.

  The held-out share (`calibration.holdout_fraction`) never reaches training;
  it calibrates the decision thresholds.
  """
  images = resolve.category_train_images(config)
  kept, held_out = split_holdout(len(images), config.calibration.holdout_fraction, config.seed)
  return images[kept], images[held_out]
