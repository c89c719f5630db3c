"""How the suite compiles: fast to compile, except where a test runs long programs.

Compiling is most of the suite's time (tiny networks, a few steps each). Two
XLA CPU options make it about 3.5x faster (a float32 AnoSeg step: 7.7 s ->
2.1 s): LLVM's optimisation level 0 and XLA's older loop emitters instead of
its fusion emitters. They change how fast a program runs, not what it
computes beyond the order of float32 rounding, which every tolerance here
allows for (a test comparing bits compares two runs of the same options).
A program a test runs for long, such as the device SLIC on 256 x 256 images
(33 s instead of 4 s), is compiled with XLA's defaults by `at_xla_defaults`.
"""

from typing import Any

import jax

# XLA option: (the suite's value, XLA's default).
OPTIONS = {
    'xla_backend_optimization_level': (0, 2),
    'xla_cpu_use_fusion_emitters': (False, True),
}


def xla_flags(flags: str) -> str:
  """XLA_FLAGS `flags` with the suite's value of each option `flags` does not set."""
  added = [f'--{name}={str(value).lower()}' for name, (value, _) in OPTIONS.items()
           if f'--{name}=' not in flags]
  return ' '.join([flags, *added]).strip()


def at_xla_defaults(jitted: Any, *args: Any, **kwargs: Any) -> Any:
  """`jitted` (a jax.jit function) compiled for `args` with XLA's default options."""
  return jitted.lower(*args, **kwargs).compile(
      compiler_options={name: default for name, (_, default) in OPTIONS.items()})
