"""Memory of a run's worker processes, and whether each has loaded JAX.

  python benchmarks/worker_memory.py [--settle=5] [--timeout=600] [-- COMMAND ...]

Starts COMMAND (default: a short demo training run with 2 workers; '{workdir}'
in it becomes a temporary folder), waits until it has spawned multiprocessing
workers and they have lived --settle seconds, then prints for each its
proportional set size (PSS, /proc/<pid>/smaps_rollup: private pages plus its
share of shared ones) and whether a JAX library (jaxlib, xla_extension) is
mapped into it, as /proc/<pid>/maps shows. It then stops the run with Ctrl-C
(SIGINT) and says whether any worker outlived it. Workers only need NumPy,
SciPy, scikit-image and PIL; one that maps JAX pays hundreds of MiB for
nothing, usually because it re-imported a main module that imports JAX.
Linux only.
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEFAULT_COMMAND = [sys.executable, 'main.py', '--config=configs/demo.py',
                    '--workdir={workdir}', '--config.train.num_steps=40',
                    '--config.train.num_workers=2']
_JAX_LIBRARIES = ('jaxlib', 'xla_extension')
_POLL_S = 0.5


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read()
  except OSError:  # the process has ended
    return ''


def _stat_fields(pid: int) -> list[str]:
  """The fields of /proc/<pid>/stat after the command name: state, ppid, ..."""
  stat = _read(f'/proc/{pid}/stat')
  return stat.rsplit(')', 1)[1].split() if stat else []


def _alive(pid: int) -> bool:
  fields = _stat_fields(pid)
  return bool(fields) and fields[0] != 'Z'


def spawned_workers(parent: int) -> list[int]:
  """Pids of the multiprocessing 'spawn' children of `parent`."""
  workers = []
  for name in os.listdir('/proc'):
    if not name.isdigit():
      continue
    fields = _stat_fields(int(name))
    if (fields and int(fields[1]) == parent
        and 'multiprocessing.spawn' in _read(f'/proc/{name}/cmdline')):
      workers.append(int(name))
  return sorted(workers)


def pss_mib(pid: int) -> float:
  for line in _read(f'/proc/{pid}/smaps_rollup').splitlines():
    if line.startswith('Pss:'):
      return int(line.split()[1]) / 1024
  return float('nan')


def maps_jax(pid: int) -> bool:
  maps = _read(f'/proc/{pid}/maps')
  return any(library in maps for library in _JAX_LIBRARIES)


def wait_for_workers(run: subprocess.Popen, settle_s: float, timeout_s: float) -> list[int]:
  """Workers of `run` once the same ones have lived `settle_s`; [] if none by `timeout_s`."""
  deadline = time.monotonic() + timeout_s
  seen, since = [], time.monotonic()
  while time.monotonic() < deadline and run.poll() is None:
    workers = spawned_workers(run.pid)
    if workers != seen:
      seen, since = workers, time.monotonic()
    elif workers and time.monotonic() - since >= settle_s:
      return workers
    time.sleep(_POLL_S)
  return []


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--settle', type=float, default=5.0,
                      help='seconds the workers must have lived before measuring')
  parser.add_argument('--timeout', type=float, default=600.0,
                      help='seconds to wait for workers before giving up')
  parser.add_argument('command', nargs=argparse.REMAINDER,
                      help="the run, after '--'; '{workdir}' becomes a temporary folder")
  args = parser.parse_args()
  command = [part for part in args.command if part != '--'] or _DEFAULT_COMMAND
  with tempfile.TemporaryDirectory() as workdir:
    command = [part.replace('{workdir}', workdir) for part in command]
    log_path = os.path.join(workdir, 'run.log')
    print('run:', ' '.join(command))
    with open(log_path, 'w') as log:
      run = subprocess.Popen(command, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT)
    started = time.monotonic()
    try:
      workers = wait_for_workers(run, args.settle, args.timeout)
      if not workers:
        print(f'no workers appeared (run exit code {run.poll()}); end of its log:')
        print(_read(log_path)[-3000:])
        return
      print(f'{len(workers)} workers, measured {time.monotonic() - started:.0f} s '
            'after the start')
      print(f'{"process":<16}{"pid":>8}{"PSS MiB":>10}  JAX mapped')
      print(f'{"main":<16}{run.pid:>8}{pss_mib(run.pid):>10.1f}  {maps_jax(run.pid)}')
      for index, pid in enumerate(workers):
        print(f'{f"worker {index}":<16}{pid:>8}{pss_mib(pid):>10.1f}  {maps_jax(pid)}')
      print(f'{"workers in all":<24}{sum(pss_mib(pid) for pid in workers):>10.1f}')
    finally:
      run.send_signal(signal.SIGINT)
      try:
        run.wait(timeout=60)
      except subprocess.TimeoutExpired:
        run.kill()
        run.wait()
    time.sleep(1)
    left = [pid for pid in workers if _alive(pid)]
    print('workers left after the run stopped:', left or 'none')


if __name__ == '__main__':
  main()
