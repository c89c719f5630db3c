"""Where a run's images come from: the configured folder or the demo set."""

import ml_collections

from twostage_jax.data import cache
from twostage_jax.data import demo


def resolve_data_dir(config: ml_collections.ConfigDict) -> str:
  """`config.data_dir`, or the built-in demo set (generated on first use) when ''."""
  if config.data_dir:
    return config.data_dir
  if config.category not in demo.DEMO_CATEGORIES:
    raise ValueError(
        f'category {config.category!r} is not in the built-in demo dataset '
        f'(categories: {", ".join(demo.DEMO_CATEGORIES)}); set --config.data_dir '
        'to use your own data')
  return demo.ensure_demo_dataset(cache.default_cache_dir(config.cache_dir), config.demo)
