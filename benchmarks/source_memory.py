"""Memory of the anomaly sources in the training workers: one copy per machine, not per worker.

  python benchmarks/source_memory.py --source-dir=/data/dtd/images \
      [--copies-of=5640] [--image-size=256] [--workers=8]

Builds (or reuses) the source store of --source-dir, then a store of
--copies-of entries made by repeating its images and labels (full DTD has
5,640 images; the 1,200 of the development subset, repeated, stand in for
it). It starts the training pipeline's worker pool on that store; every
worker first reads every page of the store, the state after a long run in
which each worker has drawn every source, then builds batches. It prints
each worker's proportional set size (PSS: private pages plus its share of
pages mapped by several processes), their sum, and the ratio of that sum to
one copy of the sources and labels. Copying the sources into each worker,
as a pickled list would, makes the ratio about the number of workers.
"""

import argparse
import functools
import os
import tempfile
import time

import numpy as np

import machine

from configs import mvtec
from twostage_jax import data
from twostage_jax import synthesis
from twostage_jax.runtime import pipeline

_PAGE = 4096


def repeated_store(store: synthesis.SourceStore, count: int, folder: str
                   ) -> synthesis.SourceStore:
  """A store folder of `count` entries cycling through those of `store`."""
  order = np.arange(count) % len(store)
  arrays = {'images.npy': store.images}
  arrays.update({f'labels_n{n}.npy': store.labels(n) for n in store.n_segments})
  for name, source in arrays.items():
    out = np.lib.format.open_memmap(os.path.join(folder, name), 'w+', source.dtype,
                                    (count,) + source.shape[1:])
    for start in range(0, count, 256):
      out[start:start + 256] = source[order[start:start + 256]]
    out.flush()
    del out
  return synthesis.SourceStore.open(folder)


class TouchingSampler:
  """The training sampler, after reading every page of the store once."""

  def __init__(self, sources: synthesis.SourceStore, config, stage: int):
    arrays = [sources.images] + [sources.labels(n) for n in sources.n_segments]
    checksum = 0
    for array in arrays:
      flat = array.reshape(-1).view(np.uint8)
      checksum += int(flat[::_PAGE].sum())
    self.checksum = checksum
    self._sample = synthesis.PseudoAnomalySampler(sources, config, stage)

  def __call__(self, image, rng):
    return self._sample(image, rng)


def kilobytes(pid: int, field: str) -> int:
  with open(f'/proc/{pid}/smaps_rollup') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise RuntimeError(f'/proc/{pid}/smaps_rollup has no {field}')


def worker_pids() -> list[int]:
  """This process's spawned pool workers (not multiprocessing's resource tracker)."""
  me = os.getpid()
  pids = []
  for name in os.listdir('/proc'):
    if not name.isdigit():
      continue
    try:
      with open(f'/proc/{name}/stat') as f:
        fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
      continue
    with open(f'/proc/{name}/cmdline', 'rb') as f:
      spawned = b'spawn_main' in f.read()
    if int(fields[1]) == me and spawned:
      pids.append(int(name))
  return sorted(pids)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--source-dir', default='', help="anomaly sources ('': built-in set)")
  parser.add_argument('--copies-of', type=int, default=5640,
                      help='entries of the measured store (full DTD: 5,640)')
  parser.add_argument('--image-size', type=int, default=256)
  parser.add_argument('--workers', type=int, default=8)
  parser.add_argument('--cache-dir', default='', help='where the real store is built')
  args = parser.parse_args()
  if not os.path.exists('/proc/self/smaps_rollup'):
    raise SystemExit('needs Linux /proc/<pid>/smaps_rollup to read PSS')

  print(f'machine: {machine.describe()}')
  config = mvtec.get_config()
  config.image_size = args.image_size
  synthesis_config = config.synthesis
  start = time.perf_counter()
  store = synthesis.build_source_store(
      args.source_dir, args.image_size, synthesis_config.saim_n_segments,
      synthesis_config.saim_compactness, synthesis_config.saim_sigma,
      data.default_cache_dir(args.cache_dir), num_processes=os.cpu_count() or 1)
  print(f'source store of {len(store)} images at {args.image_size}px: {store.folder} '
        f'({time.perf_counter() - start:.0f} s)')

  with tempfile.TemporaryDirectory(prefix='source_copies_', dir=os.path.dirname(store.folder)
                                   ) as folder:
    big = repeated_store(store, args.copies_of, folder)
    one_copy = sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
    print(f'measured store: {len(big)} entries ({len(store)} repeated), sources + labels for '
          f'n_segments {big.n_segments}: {one_copy / 2**30:.2f} GiB')

    images = np.random.default_rng(0).integers(
        0, 256, (16, args.image_size, args.image_size, 3), dtype=np.uint8)
    plan = pipeline.BatchPlan(num_images=len(images), global_batch_size=8,
                              local_batch_size=8, process_index=0, seed=0, stream=1)
    factory = functools.partial(TouchingSampler, big, config, 1)
    steps = 4 * args.workers
    batches = pipeline.batches(images, factory, plan, 0, steps, args.workers,
                               prefetch=args.workers)
    for count, _ in enumerate(batches, start=1):
      if count == steps // 2:  # every worker has started, read the store and built batches
        pids = worker_pids()
        pss = {pid: kilobytes(pid, 'Pss') * 1024 for pid in pids}
        rss = {pid: kilobytes(pid, 'Rss') * 1024 for pid in pids}
    print(f'\n{"worker pid":>10}{"PSS MiB":>10}{"RSS MiB":>10}')
    for pid in pids:
      print(f'{pid:>10}{pss[pid] / 2**20:>10.0f}{rss[pid] / 2**20:>10.0f}')
    total = sum(pss.values())
    print(f'\n{len(pids)} workers: PSS summed {total / 2**30:.2f} GiB = '
          f'{total / one_copy:.2f}x one copy of the sources and labels '
          f'({one_copy / 2**30:.2f} GiB); RSS summed {sum(rss.values()) / 2**30:.2f} GiB')
    del big, batches


if __name__ == '__main__':
  main()
