"""The methods, found by name: `config.method` -> its plug-in.

Each method is a folder here whose `method.py` defines `METHOD`, an instance
of `base.Method`; adding a method means adding its folder, nothing else. A
method defined in other code joins with `register`. A plug-in is imported
when first asked for, so importing a module of one method (as host worker
processes do) loads neither the others nor JAX.
"""

import importlib
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  from twostage_jax.methods.base import Method

_FOLDER = os.path.dirname(__file__)
_FOLDERS = tuple(sorted(
    name for name in os.listdir(_FOLDER)
    if os.path.isfile(os.path.join(_FOLDER, name, 'method.py'))))
_REGISTERED: dict[str, 'Method'] = {}


def names() -> tuple[str, ...]:
  """Every method's name: the folders here and the registered ones."""
  return tuple(sorted({*_FOLDERS, *_REGISTERED}))


def register(method: 'Method') -> None:
  """Makes `method` (defined outside this package) known by its `name`."""
  if method.name in _FOLDERS:
    raise ValueError(f'method {method.name!r} is already methods/{method.name}/')
  _REGISTERED[method.name] = method


def unregister(name: str) -> None:
  """Forgets a method that `register` added."""
  del _REGISTERED[name]


def get(name: str) -> 'Method':
  """The method registered as `name`.

  Raises:
    ValueError: naming the known methods, if `name` is not one of them.
  """
  if name in _REGISTERED:
    return _REGISTERED[name]
  if name not in _FOLDERS:
    raise ValueError(f'unknown method {name!r}; known methods: {", ".join(map(repr, names()))}')
  method = importlib.import_module(f'{__name__}.{name}.method').METHOD
  if method.name != name:
    raise ValueError(f'the plug-in in methods/{name}/ calls itself {method.name!r}')
  return method


__all__ = ['get', 'names', 'register', 'unregister']
