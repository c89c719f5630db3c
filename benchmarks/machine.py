"""One line describing the machine a benchmark ran on."""

import os
import platform


def cpu_model() -> str:
  """The processor's model name from /proc/cpuinfo, else what platform knows."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown CPU'


def describe() -> str:
  return (f'{platform.platform()}, {cpu_model()}, {os.cpu_count()} CPUs, '
          f'python {platform.python_version()}')
