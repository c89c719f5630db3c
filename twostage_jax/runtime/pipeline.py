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

The workers are a `WorkerPool`, shared with the SLIC pool of evaluation
(methods/two_stage/host_slic.py): a worker that dies, killed by the out-of-memory killer
or crashed in a C extension, ends the iteration with `WorkerDied` instead of
leaving it waiting forever for the lost batch.
"""

import collections
import dataclasses
import functools
import itertools
import multiprocessing
import os
import pickle
import signal
import traceback
import uuid
from multiprocessing import connection
from multiprocessing import shared_memory
from typing import Any, Callable, Iterator

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


class WorkerDied(RuntimeError):
  """A worker process ended while it owed results: they are lost, so waiting is pointless."""

  def __init__(self, message: str, index: int | None = None, pid: int | None = None,
               exitcode: int | None = None):
    super().__init__(message)
    self.index = index
    self.pid = pid
    self.exitcode = exitcode


class WorkerTraceback(Exception):
  """The formatted traceback of an exception raised in a worker, as its cause."""


# Time for the operating system to report the exit code of a worker whose pipe
# or sentinel already says it has ended; also how long a stopped worker gets.
_EXIT_TIMEOUT_S = 5.0


def _why_it_ended(exitcode: int | None) -> str:
  """What a worker's exit code says about its end, for the message of WorkerDied."""
  if exitcode is None:
    return 'closed its pipe but still runs'
  if exitcode > 0:
    return f'exited with code {exitcode} (its traceback, if any, is in the log above)'
  if exitcode == 0:
    return 'exited before answering its tasks'
  try:
    sig = signal.Signals(-exitcode)
  except ValueError:
    return f'was ended by signal {-exitcode}'
  if sig == signal.SIGKILL:
    return 'was killed (SIGKILL), e.g. by the out-of-memory killer (see dmesg)'
  if sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT):
    return (f"crashed in native code ({sig.name}), e.g. in a C extension such as "
            "scikit-image's SLIC")
  return f'was ended by {sig.name}'


def _failure(error: Exception) -> tuple[Exception, str]:
  """`error` (or its text, when it does not survive pickling) and its traceback."""
  text = ''.join(traceback.format_exception(error))
  try:
    pickle.loads(pickle.dumps(error))
  except Exception:  # pylint: disable=broad-except
    error = RuntimeError(f'{type(error).__name__}: {error}')
  return error, text


def _raise(error: Exception, *task: Any) -> None:
  """The task function of a worker whose setup failed: every task reports why."""
  del task
  raise error


def _serve(pipe: connection.Connection, setup: Callable[..., Callable[..., Any]],
           setup_args: tuple[Any, ...]) -> None:
  """A worker: answers the tasks that arrive on `pipe` until the parent closes it."""
  # Ctrl-C reaches the whole process group; the parent handles it and stops its workers.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    run = setup(*setup_args)
  except Exception as error:  # pylint: disable=broad-except
    run = functools.partial(_raise, error)
  while True:
    try:
      task = pipe.recv()
    except EOFError:  # the parent closed the pool or has gone
      return
    try:
      reply = (True, run(*task))
    except Exception as error:  # pylint: disable=broad-except
      reply = (False, _failure(error))
    try:
      pipe.send(reply)
    except OSError:  # the parent has gone
      return


class WorkerPool:
  """Spawned processes that answer tasks in the order they were submitted.

  multiprocessing.Pool loses the task of a worker that dies and waits for it
  forever. Here each worker has its own pipe and task k goes to worker
  k mod n, so the worker owing the oldest task is always known; waiting on
  its pipe together with every worker's sentinel turns a death into
  `WorkerDied` at once. A task is sent while its worker may be busy sending
  a result, so tasks must be small (a step, an index range), never arrays:
  give those to `setup`.
  """

  def __init__(self, num_workers: int, setup: Callable[..., Callable[..., Any]],
               setup_args: tuple[Any, ...], name: str):
    """Starts the workers.

    Args:
      num_workers: processes to spawn.
      setup: picklable; each worker calls it once with `setup_args` and
        answers every task `args` with `setup(*setup_args)(*args)`.
      setup_args: picklable arguments of `setup`, sent to every worker.
      name: what the workers do, for messages, e.g. 'input pipeline'.
    """
    context = multiprocessing.get_context('spawn')
    self._name = name
    self._processes: list[multiprocessing.process.BaseProcess] = []
    self._pipes: list[connection.Connection] = []
    self._submitted = 0
    self._answered = 0
    try:
      for index in range(num_workers):
        pipe, child_pipe = context.Pipe()
        process = context.Process(target=_serve, args=(child_pipe, setup, setup_args),
                                  name=f'{name} worker {index}', daemon=True)
        try:
          process.start()
        except BaseException:
          pipe.close()
          raise
        finally:
          child_pipe.close()  # the worker's end: closes for good when the worker ends
        self._processes.append(process)
        self._pipes.append(pipe)
    except BaseException:
      self.close()
      raise

  @property
  def pids(self) -> list[int]:
    """Process ids of the workers, by worker index."""
    return [process.pid for process in self._processes]

  def submit(self, *args: Any) -> None:
    """Queues a task; its result comes after those of the tasks submitted before."""
    index = self._submitted % len(self._pipes)
    try:
      self._pipes[index].send(args)
    except OSError:
      raise self._died(index) from None
    self._submitted += 1

  def result(self) -> Any:
    """The result of the oldest unanswered task.

    Raises:
      WorkerDied: a worker ended: its tasks' results are lost.
      Exception: the one the task raised in its worker.
    """
    if self._answered == self._submitted:
      raise RuntimeError('no task is pending')
    index = self._answered % len(self._pipes)
    pipe = self._pipes[index]
    sentinels = {process.sentinel: i for i, process in enumerate(self._processes)}
    ready = connection.wait([pipe, *sentinels])
    dead = [sentinels[item] for item in ready if item is not pipe]
    if dead:
      raise self._died(dead[0])
    try:
      succeeded, value = pipe.recv()
    except EOFError:
      raise self._died(index) from None
    self._answered += 1
    if succeeded:
      return value
    error, text = value
    raise error from WorkerTraceback(text)

  def _died(self, index: int) -> WorkerDied:
    process = self._processes[index]
    process.join(_EXIT_TIMEOUT_S)
    return WorkerDied(
        f'{self._name} worker {index} (pid {process.pid}) '
        f'{_why_it_ended(process.exitcode)}; its tasks are lost',
        index, process.pid, process.exitcode)

  def close(self) -> None:
    """Stops the workers, busy or not, and waits until they are gone."""
    for pipe in self._pipes:
      pipe.close()
    for process in self._processes:
      process.terminate()
    for process in self._processes:
      process.join(_EXIT_TIMEOUT_S)
      if process.exitcode is None:
        process.kill()
        process.join()
      process.close()
    self._processes, self._pipes = [], []

  def __enter__(self) -> 'WorkerPool':
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()


def segment_prefix(pid: int | None = None) -> str:
  """The name prefix of the shared-memory segments process `pid` (default: this one) creates.

  Named after the process, so a leaked segment says whose it is and tests
  can check their own segments on a machine where other programs use
  shared memory too.
  """
  return f'twostage_{os.getpid() if pid is None else pid}_'


def new_shared_memory(size: int) -> shared_memory.SharedMemory:
  """A new shared-memory segment of `size` bytes named `segment_prefix()` + a random part."""
  return shared_memory.SharedMemory(name=segment_prefix() + uuid.uuid4().hex[:16],
                                    create=True, size=size)


# Layout of a batch written into a shared-memory slot: (name, shape, dtype, offset).
_Layout = list[tuple[str, tuple[int, ...], str, int]]


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


def _batch_builder(images: np.ndarray, make_sampler: SamplerFactory, plan: BatchPlan
                   ) -> Callable[[int, str | None], dict[str, np.ndarray] | _Layout]:
  """A worker's task: build batch `step`, into the named slot when given one."""
  sample = make_sampler()
  slots: dict[str, shared_memory.SharedMemory] = {}

  def build(step: int, slot_name: str | None) -> dict[str, np.ndarray] | _Layout:
    batch = build_batch(images, sample, plan, step)
    if slot_name is None:
      return batch
    if slot_name not in slots:
      slots[slot_name] = shared_memory.SharedMemory(name=slot_name)
    return _write_to_slot(batch, slots[slot_name]) or batch

  return build


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
    self._all = [new_shared_memory(size) for _ in range(self._count)]
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
  `make_sampler` must be picklable and is called once in each worker. A
  worker that dies raises `WorkerDied`; an exception in a worker's sampler
  is raised here.
  """
  steps = range(start_step, num_steps)
  if num_workers == 0:
    sample = make_sampler()
    for step in steps:
      yield build_batch(images, sample, plan, step)
    return
  in_flight = max(prefetch, 1)
  slots = _SharedSlots(in_flight)
  try:
    with WorkerPool(num_workers, _batch_builder, (images, make_sampler, plan),
                    'input pipeline') as pool:
      pending = collections.deque()

      def submit(step: int) -> None:
        slot = slots.acquire()
        pool.submit(step, slot)
        pending.append(slot)

      queued = iter(steps)
      for step in itertools.islice(queued, in_flight):
        submit(step)
      while pending:
        slot = pending.popleft()
        result = pool.result()
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
