"""The compute dtype policy: which dtype the networks compute in."""

import jax
import jax.numpy as jnp
import ml_collections

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config: ml_collections.ConfigDict) -> jnp.dtype:
  """`model.compute_dtype`; 'auto' is bfloat16 on GPU/TPU and float32 on CPU.

  bfloat16 halves activation memory and runs on the tensor cores; CPUs have
  no fast bfloat16 convolutions, so float32 stays their default. Parameters
  stay float32 whatever this is (mixed precision).
  """
  name = config.model.compute_dtype
  if name == 'auto':
    name = 'float32' if jax.default_backend() == 'cpu' else 'bfloat16'
  if name not in COMPUTE_DTYPES:
    raise ValueError(f"config.model.compute_dtype = {name!r} must be 'auto', "
                     f"{' or '.join(map(repr, COMPUTE_DTYPES))}")
  return COMPUTE_DTYPES[name]
