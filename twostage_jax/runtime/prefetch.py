"""Overlaps the host input pipeline with the device and measures data waits.

A background thread takes host batches from the worker pool, starts their
transfer to the devices and keeps up to `size` of them ready, so while the
device runs step n, batches n+1..n+size are already on their way. The loop
measures how long it blocks for the next batch; that time, over the wall
time, is the share the devices sat idle for lack of data.
"""

import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

_DONE = object()
_POLL_S = 0.1


class _Failure:
  """An exception raised in the transfer thread, re-raised in the loop."""

  def __init__(self, error: BaseException):
    self.error = error


class DataWaitClock:
  """Accumulates the seconds the training loop blocked for data."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    """Starts measuring afresh from now."""
    self.total_s = 0.0
    self._interval_s = 0.0
    self._interval_start = time.perf_counter()
    self._start = self._interval_start

  def add(self, seconds: float) -> None:
    self.total_s += seconds
    self._interval_s += seconds

  def interval_fraction(self) -> float:
    """Share of the wall time since the last call that was spent waiting."""
    now = time.perf_counter()
    fraction = self._interval_s / max(now - self._interval_start, 1e-9)
    self._interval_s, self._interval_start = 0.0, now
    return fraction

  def total_fraction(self) -> float:
    """Share of the wall time since the clock started that was spent waiting."""
    return self.total_s / max(time.perf_counter() - self._start, 1e-9)


def prefetch(batches: Iterator[Any], transfer: Callable[[Any], Any], size: int,
             clock: DataWaitClock) -> Iterator[Any]:
  """Yields `transfer(batch)` of every batch, up to `size` transferred ahead.

  The time spent blocked waiting for the next transferred batch is added to
  `clock`. Closing the returned generator (or leaving the loop) stops the
  thread and closes `batches`, which shuts down its workers.
  """
  ready: queue.Queue = queue.Queue(maxsize=max(size, 1))
  stop = threading.Event()

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        ready.put(item, timeout=_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def produce() -> None:
    try:
      for batch in batches:
        if not put(transfer(batch)):
          break
      put(_DONE)
    except BaseException as e:  # pylint: disable=broad-exception-caught
      put(_Failure(e))
    finally:
      close = getattr(batches, 'close', None)
      if close is not None:
        close()

  thread = threading.Thread(target=produce, name='device-prefetch', daemon=True)
  thread.start()
  try:
    while True:
      start = time.perf_counter()
      item = ready.get()
      clock.add(time.perf_counter() - start)
      if item is _DONE:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()
