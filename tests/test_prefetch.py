"""The device prefetcher: order, look-ahead, overlap, errors, shutdown, wait clock."""

import threading
import time

import pytest

from twostage_jax.runtime import prefetch


def test_yields_every_transferred_batch_in_order():
  out = list(prefetch.prefetch(iter(range(7)), lambda b: b * 10, 2, prefetch.DataWaitClock()))
  assert out == [0, 10, 20, 30, 40, 50, 60]


def test_transfers_the_next_batch_while_the_loop_holds_the_current_one():
  second_transferred = threading.Event()

  def transfer(batch):
    if batch == 1:
      second_transferred.set()
    return batch

  batches = prefetch.prefetch(iter(range(3)), transfer, 2, prefetch.DataWaitClock())
  assert next(batches) == 0
  # The loop has not asked for batch 1 yet; the thread sends it anyway.
  assert second_transferred.wait(timeout=10)
  batches.close()


@pytest.mark.parametrize('size', [1, 3])
def test_transfers_at_most_size_batches_ahead(size):
  transferred = []
  batches = prefetch.prefetch(iter(range(20)), lambda b: transferred.append(b) or b, size,
                              prefetch.DataWaitClock())
  assert next(batches) == 0
  time.sleep(0.5)  # let the thread run as far ahead as it may
  # `size` batches wait in the queue and one more is held by the blocked thread.
  assert len(transferred) <= 1 + size + 1
  assert len(transferred) >= 1 + size
  batches.close()


def test_an_error_in_the_pipeline_reaches_the_loop():
  def broken():
    yield 1
    raise ValueError('corrupt sample 7')

  batches = prefetch.prefetch(broken(), lambda b: b, 2, prefetch.DataWaitClock())
  assert next(batches) == 1
  with pytest.raises(ValueError, match='corrupt sample 7'):
    next(batches)


def test_leaving_the_loop_stops_the_thread_and_closes_the_source():
  closed = threading.Event()

  def source():
    try:
      yield from range(1000)
    finally:
      closed.set()

  batches = prefetch.prefetch(source(), lambda b: b, 2, prefetch.DataWaitClock())
  for batch in batches:
    if batch == 3:
      break
  batches.close()
  assert closed.is_set()
  assert not any(t.name == 'device-prefetch' for t in threading.enumerate())


def test_clock_counts_the_time_the_loop_blocks_on_a_slow_pipeline():
  def slow():
    for i in range(5):
      time.sleep(0.05)
      yield i

  clock = prefetch.DataWaitClock()
  assert list(prefetch.prefetch(slow(), lambda b: b, 2, clock)) == list(range(5))
  # The loop does nothing else, so it waits for every batch's 50 ms.
  assert clock.total_s >= 0.8 * 5 * 0.05
  assert 0.5 < clock.total_fraction() <= 1.0


def test_clock_counts_almost_nothing_when_batches_are_ready():
  clock = prefetch.DataWaitClock()
  batches = prefetch.prefetch(iter(range(4)), lambda b: b, 4, clock)
  first = next(batches)
  time.sleep(0.3)  # the rest are transferred meanwhile
  clock.reset()
  assert [first, *batches] == [0, 1, 2, 3]
  assert clock.total_s < 0.05


def test_interval_fraction_restarts_at_each_call():
  clock = prefetch.DataWaitClock()
  clock.add(1e6)
  assert clock.interval_fraction() > 1  # a wait far longer than the interval
  assert clock.interval_fraction() == 0.0
