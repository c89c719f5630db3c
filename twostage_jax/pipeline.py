"""Host input pipeline: per-sample seeds, batching and worker processes.

Every training sample is fixed by (seed, epoch, index): the step and the
position in the global batch give a global sample number, the number gives
the epoch and the position in that epoch's permutation of the training
images, and the sample's pseudo-anomaly is drawn from a NumPy Generator
seeded by (seed, epoch, image index). A run therefore produces the same
batches whatever the number of workers or processes, and a resumed run
continues the exact stream. This module never imports JAX: it runs in the
worker processes.
"""

import collections
import dataclasses
import functools
import multiprocessing
from typing import Callable, Iterator

import numpy as np

# (normal image float32 HxWx3 in [0, 1], rng) -> named arrays of one sample,
# e.g. {'image': HxWx3, 'mask': HxW}; every sample has the same names.
Sampler = Callable[[np.ndarray, np.random.Generator], dict[str, np.ndarray]]
SamplerFactory = Callable[[], Sampler]


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """Which samples make up this process's slice of every global batch."""

  num_images: int
  global_batch_size: int
  local_batch_size: int
  process_index: int
  seed: int

  def samples(self, step: int) -> list[tuple[int, int]]:
    """(epoch, image index) of this process's samples at `step`."""
    first = step * self.global_batch_size + self.process_index * self.local_batch_size
    out = []
    for number in range(first, first + self.local_batch_size):
      epoch, position = divmod(number, self.num_images)
      out.append((epoch, int(_epoch_order(self.seed, epoch, self.num_images)[position])))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_images: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(num_images)


def build_batch(images: np.ndarray, sample: Sampler, plan: BatchPlan,
                step: int) -> dict[str, np.ndarray]:
  """This process's slice of global batch `step`, each named array stacked."""
  samples = []
  for epoch, index in plan.samples(step):
    rng = np.random.default_rng([plan.seed, epoch, index])
    samples.append(sample(images[index].astype(np.float32) / 255.0, rng))
  return {name: np.stack([s[name] for s in samples]) for name in samples[0]}


_worker_state: dict = {}


def _init_worker(images: np.ndarray, make_sampler: SamplerFactory,
                 plan: BatchPlan) -> None:
  _worker_state.update(images=images, sample=make_sampler(), plan=plan)


def _worker_batch(step: int) -> dict[str, np.ndarray]:
  s = _worker_state
  return build_batch(s['images'], s['sample'], s['plan'], step)


def batches(images: np.ndarray, make_sampler: SamplerFactory,
            plan: BatchPlan, start_step: int, num_steps: int, num_workers: int,
            prefetch: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's batch slices for steps start_step..num_steps-1.

  With `num_workers` > 0 a pool of spawned processes builds up to `prefetch`
  batches ahead of the consumer; `make_sampler` must be picklable and is
  called once in each worker.
  """
  steps = range(start_step, num_steps)
  if num_workers == 0:
    sample = make_sampler()
    for step in steps:
      yield build_batch(images, sample, plan, step)
    return
  context = multiprocessing.get_context('spawn')
  with context.Pool(num_workers, _init_worker, (images, make_sampler, plan)) as pool:
    pending = collections.deque()
    queued = iter(steps)
    for step in queued:
      pending.append(pool.apply_async(_worker_batch, (step,)))
      if len(pending) >= max(prefetch, 1):
        break
    while pending:
      batch = pending.popleft().get()
      step = next(queued, None)
      if step is not None:
        pending.append(pool.apply_async(_worker_batch, (step,)))
      yield batch
