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
  import ml_collections

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


def trained_config(workdir: str) -> 'ml_collections.ConfigDict | None':
  """The config `workdir` was trained with; None for a new workdir.

  A run trained before a key was added lacks it: its method's config file
  (`Method.config_file`, in the installed `configs` package) gives the value,
  as it does for a command on the workdir.
  """
  from twostage_jax.workdir import run_config  # pylint: disable=import-outside-toplevel
  return run_config.load(workdir, _config_file_config)


def _config_file_config(name: str) -> 'ml_collections.ConfigDict | None':
  """The config of method `name`'s config file; None if it names none."""
  config_file = get(name).config_file
  if not config_file:
    return None
  return importlib.import_module(config_file.removesuffix('.py').replace('/', '.')).get_config()


__all__ = ['get', 'names', 'register', 'trained_config', 'unregister']
