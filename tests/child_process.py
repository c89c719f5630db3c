"""main.py, or a second JAX process, run as a child of a test.

The child keeps the parent's XLA_FLAGS (an instruction-set limit such as
--xla_cpu_max_isa=AVX2 must reach it too, or it computes with other kernels
than the test it is compared with) and sets only the number of simulated
CPU devices.
"""

import contextlib
import dataclasses
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def main_command(config_file: str, workdir, values: dict, mode: str = 'train') -> list[str]:
  """The argv of main.py with configs/`config_file` and `--config.<key>=<value>` per value."""
  flags = [f'--config.{key}={value}' for key, value in values.items()]
  return [sys.executable, os.path.join(ROOT, 'main.py'),
          f'--config={os.path.join(ROOT, "configs", config_file)}',
          f'--workdir={workdir}', f'--mode={mode}'] + flags


def free_port() -> int:
  """A TCP port on localhost that nothing listens on now (for a JAX coordinator)."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Finished:
  returncode: int
  stdout: str
  stderr: str


def run_together(commands: list[list[str]], envs: list[dict[str, str]], folder: pathlib.Path,
                 timeout: float = 600) -> list[Finished]:
  """Runs the commands at once (the processes of one distributed run) and waits for all.

  Their output goes to files in `folder`, not to pipes: a process whose pipe
  is full blocks, and the others then wait for it in a collective forever.
  """
  with contextlib.ExitStack() as files:
    outputs = [[files.enter_context(open(folder / f'process{i}.{name}', 'w+', encoding='utf-8'))
                for name in ('stdout', 'stderr')] for i in range(len(commands))]
    processes = [subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=err, text=True)
                 for command, env, (out, err) in zip(commands, envs, outputs)]
    deadline = time.monotonic() + timeout
    try:
      for process in processes:
        process.wait(timeout=max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
      for process in processes:
        process.kill()
      raise
    for output in outputs:
      for file in output:
        file.seek(0)
    return [Finished(process.returncode, out.read(), err.read())
            for process, (out, err) in zip(processes, outputs)]
