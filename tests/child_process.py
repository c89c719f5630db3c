"""The environment of a test's child process (main.py, a second JAX process).

It keeps the parent's XLA_FLAGS (an instruction-set limit such as
--xla_cpu_max_isa=AVX2 must reach the child too, or the child computes with
other kernels than the test it is compared with) and sets only the number
of simulated CPU devices.
"""

import os
import re

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def xla_flags(num_devices: int, flags: str) -> str:
  """`flags` with the simulated device count set to `num_devices`."""
  others = re.sub(rf'{DEVICE_COUNT_FLAG}=\S+', '', flags).split()
  return ' '.join(others + [f'{DEVICE_COUNT_FLAG}={num_devices}'])


def environment(num_devices: int, **extra: str) -> dict[str, str]:
  """os.environ for a child with `num_devices` CPU devices, plus `extra`."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', **extra)
  env['XLA_FLAGS'] = xla_flags(num_devices, env.get('XLA_FLAGS', ''))
  return env
