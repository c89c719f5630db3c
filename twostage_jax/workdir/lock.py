"""One run per workdir: a lock file names the run that owns the folder.

Two runs writing checkpoints, thresholds and reports into one workdir would
corrupt each other's files, so a run takes `<workdir>/.lock` when it starts
and removes it when it ends; a second run fails at once, told who holds it.

The processes of one multi-host run share the lock: they are given the same
run id, process 0 creates the lock and the others check that it names their
run. A run killed without cleaning up (kill -9, a lost host) leaves a stale
lock, which the next run takes over with a warning: on the holder's host a
lock is stale when its process is gone (a reused pid is told apart by the
process start time); seen from another host (shared filesystem) it is stale
when the holder stopped refreshing its heartbeat.

Creating the lock uses O_CREAT|O_EXCL and a takeover replaces the stale file
under an flock, so of two runs starting together exactly one wins.
"""

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from typing import Iterator

from absl import logging

from twostage_jax.workdir import atomic_write
from twostage_jax.workdir import paths

HEARTBEAT_PERIOD_S = 30.0
# A holder on another host whose heartbeat is older than this is gone.
STALE_AFTER_S = 300.0
# How long processes other than 0 wait for process 0's lock to appear.
JOIN_TIMEOUT_S = 120.0
# A lock file that is empty or not JSON for this long was left by a crash
# between its creation and its first write.
UNREADABLE_GRACE_S = 10.0
_POLL_S = 0.2


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir; the message says which."""


@dataclasses.dataclass(frozen=True)
class Holder:
  """The run holding a workdir, as its lock file records it."""
  host: str
  pid: int
  start_time: int | None  # of the process, in clock ticks since boot (Linux)
  run_id: str
  acquired_at: float  # seconds since the epoch
  heartbeat: float

  def describe(self) -> str:
    since = time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.acquired_at))
    return (f'pid {self.pid} on host {self.host} (run id {self.run_id}, since {since}, '
            f'heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago)')


def new_run_id() -> str:
  """A fresh run id; a multi-host run broadcasts process 0's to the others."""
  return uuid.uuid4().hex


def _process_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks since boot) of process `pid`; None if unknown."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii', errors='replace') as f:
      stat = f.read()
  except OSError:
    return None
  # Field 2 (the command name) may hold spaces and parentheses; the fields
  # after its closing parenthesis start at field 3 (state), and field 22 is
  # the start time.
  fields = stat.rsplit(')', 1)[1].split()
  return fields[0], int(fields[19])


def process_start_time(pid: int) -> int | None:
  """The start time of process `pid`, None if unknown (no /proc).

  Tells a live holder from an unrelated process that reuses its pid.
  """
  stat = _process_stat(pid)
  return stat[1] if stat else None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def read_holder(workdir: str) -> Holder | None:
  """The holder named by `workdir`'s lock; None if there is no readable lock."""
  try:
    with open(paths.lock_file(workdir), encoding='utf-8') as f:
      return Holder(**json.load(f))
  except (FileNotFoundError, ValueError, TypeError):
    return None


def is_stale(holder: Holder, stale_after_s: float = STALE_AFTER_S) -> bool:
  """Whether `holder` is gone: its process has ended, or its heartbeat stopped."""
  if holder.host != socket.gethostname():
    return time.time() - holder.heartbeat > stale_after_s
  if not _pid_alive(holder.pid):
    return True
  stat = _process_stat(holder.pid)
  if stat is None:
    return False  # alive, and no /proc to tell a reused pid apart
  state, start_time = stat
  # A zombie has ended but is not yet reaped; another start time is another process.
  return state == 'Z' or (holder.start_time is not None and start_time != holder.start_time)


class WorkdirLock:
  """Holds `<workdir>/.lock` for one run; use as a context manager.

  Example:
    with workdir_lock.WorkdirLock(workdir, run_id, is_primary=jax.process_index() == 0):
      train(...)
  """

  def __init__(self, workdir: str, run_id: str | None = None, is_primary: bool = True,
               heartbeat_period_s: float = HEARTBEAT_PERIOD_S,
               stale_after_s: float = STALE_AFTER_S,
               join_timeout_s: float = JOIN_TIMEOUT_S):
    """Describes the lock; `acquire` (or `with`) takes it.

    Args:
      workdir: the run's folder (created if missing).
      run_id: the id shared by every process of this run; a fresh one if None.
      is_primary: True for the process that creates and removes the lock
        (process 0); the others wait for it and join it. Processes of one
        run that all pass True also work: the first creates it, the others
        find their run id in it and join.
      heartbeat_period_s: how often the holder refreshes its heartbeat.
      stale_after_s: heartbeat age after which a holder on another host is gone.
      join_timeout_s: how long a process that is not primary waits for the lock.
    """
    self.workdir = os.path.abspath(workdir)
    self.path = paths.lock_file(self.workdir)
    self.run_id = run_id or new_run_id()
    self.is_primary = is_primary
    self._heartbeat_period_s = heartbeat_period_s
    self._stale_after_s = stale_after_s
    self._join_timeout_s = join_timeout_s
    self._owned = False
    self._stop = threading.Event()
    self._heartbeat_thread: threading.Thread | None = None

  def _record(self) -> dict:
    now = time.time()
    return dataclasses.asdict(Holder(
        host=socket.gethostname(), pid=os.getpid(),
        start_time=process_start_time(os.getpid()), run_id=self.run_id,
        acquired_at=now, heartbeat=now))

  def _in_use(self, holder: Holder) -> WorkdirLocked:
    return WorkdirLocked(
        f'workdir {self.workdir} is in use by another run: {holder.describe()}. '
        f'Wait for it to end or choose another --workdir; if that run is gone and '
        f'this persists, delete {self.path}.')

  def acquire(self) -> None:
    """Takes the lock, or joins it as a member of the run that holds it.

    Raises:
      WorkdirLocked: another live run holds the workdir.
    """
    os.makedirs(self.workdir, exist_ok=True)
    if not self.is_primary:
      self._join()
      return
    self._create()
    if self._owned:
      self._stop.clear()
      self._heartbeat_thread = threading.Thread(
          target=self._beat, name='workdir-lock-heartbeat', daemon=True)
      self._heartbeat_thread.start()

  def _create(self) -> None:
    while True:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        if self._take_over_if_stale():
          return
        continue
      with os.fdopen(fd, 'w', encoding='utf-8') as f:
        json.dump(self._record(), f, indent=2)
        f.flush()
        os.fsync(f.fileno())
      self._owned = True
      return

  def _take_over_if_stale(self) -> bool:
    """Replaces an existing lock if its holder is gone; raises if it is held.

    Returns False if the lock changed or vanished meanwhile (try again).
    """
    seen, holder = self._read_raw()
    if seen is None:
      return False
    if holder is not None and holder.run_id == self.run_id:
      self._owned = False  # a member of this run created it; join it
      return True
    if holder is None:
      if time.time() - seen[1] < UNREADABLE_GRACE_S:
        time.sleep(_POLL_S)  # another run is writing its new lock
        return False
    elif not is_stale(holder, self._stale_after_s):
      raise self._in_use(holder)
    with self._takeover_guard():
      current, _ = self._read_raw()
      if current is None or current[0] != seen[0]:
        return False
      atomic_write.write_json(self.path, self._record())
    logging.warning('took over the lock of workdir %s from a run that is gone: %s',
                    self.workdir, holder.describe() if holder else 'an unreadable lock file')
    self._owned = True
    return True

  @contextlib.contextmanager
  def _takeover_guard(self) -> Iterator[None]:
    fd = os.open(paths.lock_takeover_file(self.workdir), os.O_CREAT | os.O_RDWR, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
      yield
    finally:
      os.close(fd)  # releases the flock

  def _read_raw(self) -> tuple[tuple[bytes, float] | None, Holder | None]:
    """((content, modification time), holder) of the lock file; (None, None) if absent."""
    try:
      with open(self.path, 'rb') as f:
        content = f.read()
        modified = os.fstat(f.fileno()).st_mtime
    except FileNotFoundError:
      return None, None
    try:
      holder = Holder(**json.loads(content))
    except (ValueError, TypeError):
      holder = None
    return (content, modified), holder

  def _join(self) -> None:
    deadline = time.monotonic() + self._join_timeout_s
    holder = read_holder(self.workdir)
    while holder is None or holder.run_id != self.run_id:
      if time.monotonic() > deadline:
        if holder is None:
          raise WorkdirLocked(
              f'process 0 of run {self.run_id} did not create the lock {self.path} '
              f'within {self._join_timeout_s:.0f} s')
        raise self._in_use(holder)
      time.sleep(_POLL_S)
      holder = read_holder(self.workdir)

  def _beat(self) -> None:
    """Refreshes the heartbeat until released; stops if the lock is no longer ours."""
    while not self._stop.wait(self._heartbeat_period_s):
      holder = read_holder(self.workdir)
      if not self._is_ours(holder):
        logging.error('the lock of workdir %s no longer names this run (now: %s)',
                      self.workdir, holder.describe() if holder else 'no lock')
        return
      record = dataclasses.asdict(holder)
      record['heartbeat'] = time.time()
      atomic_write.write_json(self.path, record)

  def _is_ours(self, holder: Holder | None) -> bool:
    return (holder is not None and holder.run_id == self.run_id
            and holder.pid == os.getpid() and holder.host == socket.gethostname())

  def release(self) -> None:
    """Removes the lock if this process created it and it still names this run."""
    self._stop.set()
    if self._heartbeat_thread is not None:
      self._heartbeat_thread.join()
      self._heartbeat_thread = None
    if self._owned and self._is_ours(read_holder(self.workdir)):
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)
    self._owned = False

  def __enter__(self) -> 'WorkdirLock':
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()
