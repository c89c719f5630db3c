"""Which dtype each convolution of a network computes in (mixed-precision tests)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def conv_output_dtypes(model: nn.Module, variables, x) -> dict[int, set]:
  """{output channels: dtypes} of every convolution of a forward pass (traced only)."""
  _, state = jax.eval_shape(
      lambda v: model.apply(v, x, train=False, mutable=['intermediates'],
                            capture_intermediates=lambda module, _: isinstance(module, nn.Conv)),
      variables)
  dtypes = {}
  for output in jax.tree.leaves(state['intermediates']):
    dtypes.setdefault(output.shape[-1], set()).add(output.dtype)
  return dtypes


def float64_output_dtypes(model: nn.Module, variables, x) -> set:
  """The dtypes of every module's outputs in a float64 forward pass of `model`.

  Traced only (jax.eval_shape), under 64-bit JAX with the variables and the
  input cast to float64: with `dtype=jnp.float64` a module that still casts
  to float32 shows up here.
  """
  with jax.enable_x64(True):
    as64 = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float64), t)
    _, state = jax.eval_shape(
        lambda v, y: model.apply(v, y, train=False, mutable=['intermediates'],
                                 capture_intermediates=True), as64(variables), as64(x))
    return {leaf.dtype for leaf in jax.tree.leaves(state['intermediates'])}
