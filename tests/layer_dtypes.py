"""Which dtype each convolution of a network computes in (mixed-precision tests)."""

import flax.linen as nn
import jax


def conv_output_dtypes(model: nn.Module, variables, x) -> dict[int, set]:
  """{output channels: dtypes} of every convolution of a forward pass."""
  _, state = model.apply(variables, x, train=False, mutable=['intermediates'],
                         capture_intermediates=lambda module, _: isinstance(module, nn.Conv))
  dtypes = {}
  for output in jax.tree.leaves(state['intermediates']):
    dtypes.setdefault(output.shape[-1], set()).add(output.dtype)
  return dtypes
