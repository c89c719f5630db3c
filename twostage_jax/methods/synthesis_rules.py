"""Config rules of the host synthesis sections the two-stage model and Bauer read."""

import ml_collections

from twostage_jax.methods.base import Rule
from twostage_jax.synthesis import augment

# `synthesis`: the two-stage model's Perlin and superpixel pseudo-anomalies.
SYNTHESIS: tuple[Rule, ...] = (
    ('synthesis.recipe', lambda v: v in augment.POOLS,
     ' or '.join(map(repr, augment.POOLS))),
    ('synthesis.p_anomaly', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('synthesis.p_perlin', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('synthesis.beta_max', lambda v: 0 <= v <= 1, 'in [0, 1]'),
    ('synthesis.perlin_max_exponent', lambda v: v >= 0, '0 or more'),
    ('synthesis.num_augmenters', lambda v: 0 <= v <= 10, 'between 0 and 10'),
    ('synthesis.saim_fraction', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('synthesis.saim_n_segments', lambda v: len(v) > 0 and all(n > 1 for n in v),
     'a non-empty list of segment counts > 1'),
    ('synthesis.p_distortion', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('synthesis.p_self_source', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
)

# `distortion`: Bauer's patch distortion (also a pseudo-anomaly of the two-stage model).
DISTORTION: tuple[Rule, ...] = (
    ('distortion.p_distort', lambda v: 0 <= v <= 1, 'a probability in [0, 1]'),
    ('distortion.patch_min_fraction', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('distortion.patch_max_fraction', lambda v: 0 < v <= 1, 'in (0, 1]'),
    ('distortion.shape_threshold', lambda v: 0 <= v < 1, 'in [0, 1)'),
)


def recipe_problems(config: ml_collections.ConfigDict) -> list[str]:
  """Whether num_augmenters fits the pool of the synthesis recipe (a rule of two keys)."""
  synthesis = config.synthesis
  pool = augment.POOLS.get(synthesis.recipe)
  if pool is None or synthesis.num_augmenters <= len(pool):
    return []
  return [f'config.synthesis.num_augmenters = {synthesis.num_augmenters} must be at most '
          f'{len(pool)}, the augmenters of synthesis.recipe {synthesis.recipe!r}']
