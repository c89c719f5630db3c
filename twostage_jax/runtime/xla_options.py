"""XLA compiler options from the config, kept only where this jaxlib knows them.

XLA's CPU backend has options that change its speed a lot from one jaxlib to
the next (e.g. which ops YNNPACK fuses), and an option a jaxlib does not
know makes every compilation fail. The configs name the options they want
(`xla_cpu_options`); each is tried once on a tiny computation and dropped,
with a warning, where the installed jaxlib rejects it, so a config written
for one jaxlib still runs on another.
"""

import functools
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging


@functools.cache
def _accepted(name: str, value: Any) -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(1.0).compile()
  except jax.errors.JaxRuntimeError as error:
    logging.warning('XLA option %s=%s is not supported by jaxlib %s; running without it '
                    '(%s)', name, value, jax.lib.__version__, str(error).splitlines()[0])
    return False
  return True


def supported(options: Mapping[str, Any]) -> dict[str, Any]:
  """The entries of `options` that this jaxlib's compiler accepts."""
  return {name: value for name, value in options.items() if _accepted(name, value)}


def compiler_options(config: Any) -> dict[str, Any]:
  """The config's `xla_cpu_options` that apply here: on the CPU backend, if supported."""
  if jax.default_backend() != 'cpu':
    return {}
  return supported(dict(config.xla_cpu_options))
