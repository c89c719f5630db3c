"""The registry of methods: `config.method` -> its plug-in.

Adding a method means adding its module under `methods/` and one entry here.
"""

from twostage_jax.methods.anoseg import AnoSeg
from twostage_jax.methods.base import Method
from twostage_jax.methods.bauer import Bauer
from twostage_jax.methods.two_stage import TwoStage
from twostage_jax.methods.utad import UTAD

_REGISTRY: dict[str, Method] = {method.name: method for method in (TwoStage(), Bauer(), AnoSeg(), UTAD())}
NAMES = tuple(sorted(_REGISTRY))


def get(name: str) -> Method:
  """The method registered as `name`.

  Raises:
    ValueError: naming the known methods, if `name` is not one of them.
  """
  if name not in _REGISTRY:
    raise ValueError(f'unknown method {name!r}; known methods: {", ".join(map(repr, NAMES))}')
  return _REGISTRY[name]


__all__ = ['Method', 'NAMES', 'get']
