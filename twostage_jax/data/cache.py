"""Where derived data (demo dataset, tfds cache, SLIC labels) is stored."""

import os

CACHE_ENV_VAR = 'TWOSTAGE_JAX_CACHE'


def default_cache_dir(cache_dir: str) -> str:
  """Resolves `config.cache_dir`: the value if set, else $TWOSTAGE_JAX_CACHE.

  Falls back to ~/.cache/twostage_jax so that repeated runs share derived data
  without any setting. The folder is not created here.
  """
  if not cache_dir:
    cache_dir = os.environ.get(CACHE_ENV_VAR) or os.path.join(
        '~', '.cache', 'twostage_jax')
  return os.path.abspath(os.path.expanduser(cache_dir))
