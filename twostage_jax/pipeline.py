"""Host input pipeline: per-sample seeds, batching and worker processes.

Every training sample is fixed by (seed, stream, epoch, index): the step and
the position in the global batch give a global sample number, the number
gives the epoch and the position in that epoch's permutation of the training
images, and the sample's pseudo-anomaly is drawn from a NumPy Generator
seeded by (seed, stream, epoch, image index). The stream is the training
stage, so stage 2 learns on pseudo-anomalies of its own, not on the ones
stage 1 was fitted to. A run therefore produces the same
batches whatever the number of workers or processes, and a resumed run
continues the exact stream. This module never imports JAX: it runs in the
worker processes.
"""

import collections
import dataclasses
import functools
import itertools
import multiprocessing
from multiprocessing import shared_memory
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
  stream: int  # the training stage: each has its own order and pseudo-anomalies

  def samples(self, step: int) -> list[tuple[int, int]]:
    """(epoch, image index) of this process's samples at `step`."""
    first = step * self.global_batch_size + self.process_index * self.local_batch_size
    out = []
    for number in range(first, first + self.local_batch_size):
      epoch, position = divmod(number, self.num_images)
      order = _epoch_order(self.seed, self.stream, epoch, self.num_images)
      out.append((epoch, int(order[position])))
    return out

  def rng(self, epoch: int, index: int) -> np.random.Generator:
    """The generator of the sample of image `index` in `epoch`."""
    return np.random.default_rng([self.seed, self.stream, epoch, index])


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, stream: int, epoch: int, num_images: int) -> np.ndarray:
  return np.random.default_rng([seed, stream, epoch]).permutation(num_images)


def build_batch(images: np.ndarray, sample: Sampler, plan: BatchPlan,
                step: int) -> dict[str, np.ndarray]:
  """This process's slice of global batch `step`, each named array stacked."""
  samples = []
  for epoch, index in plan.samples(step):
    samples.append(sample(images[index].astype(np.float32) / 255.0, plan.rng(epoch, index)))
  return {name: np.stack([s[name] for s in samples]) for name in samples[0]}


# Layout of a batch written into a shared-memory slot: (name, shape, dtype, offset).
_Layout = list[tuple[str, tuple[int, ...], str, int]]

_worker_state: dict = {}


def _init_worker(images: np.ndarray, make_sampler: SamplerFactory,
                 plan: BatchPlan) -> None:
  _worker_state.update(images=images, sample=make_sampler(), plan=plan, slots={})


def _write_to_slot(batch: dict[str, np.ndarray], slot: shared_memory.SharedMemory
                   ) -> _Layout | None:
  """Copies `batch` into `slot`; None if it does not fit."""
  if sum(array.nbytes for array in batch.values()) > slot.size:
    return None
  layout, offset = [], 0
  for name, array in batch.items():
    np.ndarray(array.shape, array.dtype, buffer=slot.buf, offset=offset)[...] = array
    layout.append((name, array.shape, array.dtype.str, offset))
    offset += array.nbytes
  return layout


def _worker_batch(step: int, slot_name: str | None) -> dict[str, np.ndarray] | _Layout:
  """Builds batch `step`; writes it to the named slot when given one."""
  s = _worker_state
  batch = build_batch(s['images'], s['sample'], s['plan'], step)
  if slot_name is None:
    return batch
  if slot_name not in s['slots']:
    s['slots'][slot_name] = shared_memory.SharedMemory(name=slot_name)
  return _write_to_slot(batch, s['slots'][slot_name]) or batch


class _SharedSlots:
  """Shared-memory buffers that carry batches from the workers.

  Pickling a batch through the pool's pipe costs more than synthesising it
  at 256x256 (tens of ms for 8 float32 images); a worker instead writes into
  a free slot and returns only the layout. Slots are sized by the first
  batch, which travels through the pipe, and reused.
  """

  def __init__(self, count: int):
    self._count = count
    self._free: list[str] = []
    self._all: list[shared_memory.SharedMemory] = []

  def acquire(self) -> str | None:
    return self._free.pop() if self._free else None

  def allocate(self, batch: dict[str, np.ndarray]) -> None:
    """Creates the slots, each large enough for `batch`, once."""
    if self._all:
      return
    size = sum(array.nbytes for array in batch.values())
    self._all = [shared_memory.SharedMemory(create=True, size=size)
                 for _ in range(self._count)]
    self._free = [slot.name for slot in self._all]

  def read(self, slot_name: str, layout: _Layout) -> dict[str, np.ndarray]:
    """Copies a batch out of a slot and frees the slot."""
    slot = next(s for s in self._all if s.name == slot_name)
    batch = {name: np.ndarray(shape, np.dtype(dtype), buffer=slot.buf, offset=offset).copy()
             for name, shape, dtype, offset in layout}
    self._free.append(slot_name)
    return batch

  def release(self, slot_name: str) -> None:
    self._free.append(slot_name)

  def close(self) -> None:
    for slot in self._all:
      slot.close()
      slot.unlink()
    self._all, self._free = [], []


def batches(images: np.ndarray, make_sampler: SamplerFactory,
            plan: BatchPlan, start_step: int, num_steps: int, num_workers: int,
            prefetch: int) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's batch slices for steps start_step..num_steps-1.

  With `num_workers` > 0 a pool of spawned processes builds up to `prefetch`
  batches ahead of the consumer and hands them over in shared memory;
  `make_sampler` must be picklable and is called once in each worker.
  """
  steps = range(start_step, num_steps)
  if num_workers == 0:
    sample = make_sampler()
    for step in steps:
      yield build_batch(images, sample, plan, step)
    return
  in_flight = max(prefetch, 1)
  slots = _SharedSlots(in_flight)
  context = multiprocessing.get_context('spawn')
  try:
    with context.Pool(num_workers, _init_worker, (images, make_sampler, plan)) as pool:
      pending = collections.deque()

      def submit(step: int) -> None:
        slot = slots.acquire()
        pending.append((pool.apply_async(_worker_batch, (step, slot)), slot))

      queued = iter(steps)
      for step in itertools.islice(queued, in_flight):
        submit(step)
      while pending:
        result, slot = pending.popleft()
        result = result.get()
        if isinstance(result, dict):
          batch = result
          slots.allocate(batch)
          if slot is not None:
            slots.release(slot)
        else:
          batch = slots.read(slot, result)
        step = next(queued, None)
        if step is not None:
          submit(step)
        yield batch
  finally:
    slots.close()
