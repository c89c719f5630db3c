"""The compute dtype policy: which dtype the networks compute in.

bfloat16 and float32 are the training dtypes. float64 is a numerical
reference, not a training setting: it needs 64-bit JAX (JAX_ENABLE_X64=1),
and the tests use it where float32 rounding would decide a comparison (two
data-parallel layouts of one step agree to float64 precision, not float32's).
Whatever the compute dtype, last layers, maps, losses and statistics
compute in at least float32 (`widen`).
"""

import jax
import jax.numpy as jnp
import ml_collections

COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}


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
                     f"{', '.join(map(repr, COMPUTE_DTYPES))}")
  if name == 'float64' and not jax.config.jax_enable_x64:
    raise ValueError("config.model.compute_dtype = 'float64' needs 64-bit JAX: set "
                     'JAX_ENABLE_X64=1 (float64 is a numerical reference, not a training '
                     'setting)')
  return COMPUTE_DTYPES[name]


def widened(dtype: jnp.dtype) -> jnp.dtype:
  """At least float32: bfloat16 and integers become float32, float64 stays float64."""
  return jnp.promote_types(dtype, jnp.float32)


def widen(x: jax.Array) -> jax.Array:
  """`x` in `widened(x.dtype)`: what last layers, maps, losses and statistics compute in."""
  return x.astype(widened(x.dtype))
