"""One run per workdir: the lock refuses a second run and survives kill -9."""

import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from twostage_jax.workdir import lock as workdir_lock
from twostage_jax.workdir import paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()


def write_lock(workdir, **fields):
  record = {'host': HOST, 'pid': os.getpid(),
            'start_time': workdir_lock.process_start_time(os.getpid()), 'run_id': 'old-run',
            'acquired_at': time.time() - 60, 'heartbeat': time.time()}
  record.update(fields)
  os.makedirs(workdir, exist_ok=True)
  with open(paths.lock_file(workdir), 'w') as f:
    json.dump(record, f)


def python(code, *args):
  """Starts a Python process running `code` with the repository importable."""
  return subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(code), *args], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def dead_pid():
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_the_lock_names_its_holder_while_held_and_is_removed_after(tmp_path):
  workdir = str(tmp_path / 'run')
  with workdir_lock.WorkdirLock(workdir, run_id='run-1'):
    holder = workdir_lock.read_holder(workdir)
    assert (holder.host, holder.pid, holder.run_id) == (HOST, os.getpid(), 'run-1')
    assert holder.start_time == workdir_lock.process_start_time(os.getpid())
    assert time.time() - 5 < holder.acquired_at <= holder.heartbeat <= time.time()
  assert not os.path.exists(paths.lock_file(workdir))


def test_a_second_run_is_refused_naming_the_holder(tmp_path):
  workdir = str(tmp_path)
  with workdir_lock.WorkdirLock(workdir, run_id='first'):
    before = pathlib.Path(paths.lock_file(str(tmp_path))).read_text()
    with pytest.raises(workdir_lock.WorkdirLocked) as raised:
      workdir_lock.WorkdirLock(workdir, run_id='second').acquire()
    message = str(raised.value)
    assert f'pid {os.getpid()}' in message
    assert f'host {HOST}' in message
    assert 'run id first' in message and 'since' in message
    assert pathlib.Path(paths.lock_file(str(tmp_path))).read_text() == before


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
  holder = python('''
      import sys, time
      from twostage_jax.workdir import lock as workdir_lock
      lock = workdir_lock.WorkdirLock(sys.argv[1], run_id='killed-run')
      lock.acquire()
      print('locked', flush=True)
      time.sleep(60)
      ''', str(tmp_path))
  assert holder.stdout.readline().strip() == 'locked', holder.stderr.read()
  with pytest.raises(workdir_lock.WorkdirLocked):
    workdir_lock.WorkdirLock(str(tmp_path)).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with caplog.at_level(logging.WARNING):
    with workdir_lock.WorkdirLock(str(tmp_path), run_id='next-run'):
      assert workdir_lock.read_holder(str(tmp_path)).run_id == 'next-run'
  assert any(f'pid {holder.pid}' in w and 'killed-run' in w for w in warnings_of(caplog))


def test_a_killed_holder_not_yet_reaped_is_stale(tmp_path):
  holder = python('''
      import sys, time
      from twostage_jax.workdir import lock as workdir_lock
      workdir_lock.WorkdirLock(sys.argv[1], run_id='zombie').acquire()
      print('locked', flush=True)
      time.sleep(60)
      ''', str(tmp_path))
  assert holder.stdout.readline().strip() == 'locked', holder.stderr.read()
  holder.send_signal(signal.SIGKILL)
  deadline = time.monotonic() + 10
  while open(f'/proc/{holder.pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z':
    assert time.monotonic() < deadline
    time.sleep(0.01)
  with workdir_lock.WorkdirLock(str(tmp_path), run_id='next-run'):
    assert workdir_lock.read_holder(str(tmp_path)).run_id == 'next-run'
  holder.wait()


def test_a_reused_pid_of_another_process_is_stale(tmp_path):
  # The recorded pid is alive (this process) but started at another time.
  write_lock(str(tmp_path), start_time=workdir_lock.process_start_time(os.getpid()) + 1)
  assert workdir_lock.is_stale(workdir_lock.read_holder(str(tmp_path)))
  write_lock(str(tmp_path), pid=dead_pid())
  assert workdir_lock.is_stale(workdir_lock.read_holder(str(tmp_path)))
  write_lock(str(tmp_path))
  assert not workdir_lock.is_stale(workdir_lock.read_holder(str(tmp_path)))


def test_a_holder_on_another_host_is_stale_only_once_its_heartbeat_stops(tmp_path, caplog):
  workdir = str(tmp_path)
  write_lock(workdir, host='other-host.example', pid=1, heartbeat=time.time() - 5)
  with pytest.raises(workdir_lock.WorkdirLocked, match='host other-host.example'):
    workdir_lock.WorkdirLock(workdir, stale_after_s=300).acquire()
  write_lock(workdir, host='other-host.example', pid=1, heartbeat=time.time() - 400)
  with caplog.at_level(logging.WARNING):
    with workdir_lock.WorkdirLock(workdir, run_id='new', stale_after_s=300):
      assert workdir_lock.read_holder(workdir).host == HOST
  assert any('other-host.example' in w for w in warnings_of(caplog))


def test_the_holder_refreshes_its_heartbeat(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_period_s=0.05):
    first = workdir_lock.read_holder(str(tmp_path))
    deadline = time.monotonic() + 10
    while workdir_lock.read_holder(str(tmp_path)).heartbeat < first.heartbeat + 0.1:
      assert time.monotonic() < deadline, 'heartbeat not refreshed'
      time.sleep(0.05)
    assert workdir_lock.read_holder(str(tmp_path)).acquired_at == first.acquired_at


def test_the_processes_of_one_run_share_the_lock(tmp_path):
  workdir = str(tmp_path)
  joined = []
  # Process 1 may start before process 0 has created the lock: it waits.
  member = threading.Thread(target=lambda: joined.append(workdir_lock.WorkdirLock(
      workdir, run_id='shared', is_primary=False, join_timeout_s=30).acquire()))
  member.start()
  time.sleep(0.3)
  with workdir_lock.WorkdirLock(workdir, run_id='shared'):
    member.join()
    assert joined == [None]
    second = workdir_lock.WorkdirLock(workdir, run_id='shared', is_primary=False)
    second.acquire()
    second.release()  # only process 0 removes the lock
    assert workdir_lock.read_holder(workdir).run_id == 'shared'
    with pytest.raises(workdir_lock.WorkdirLocked, match='run id shared'):
      workdir_lock.WorkdirLock(workdir, run_id='other', is_primary=False,
                               join_timeout_s=0.3).acquire()


def test_a_member_waits_a_bounded_time_for_the_lock(tmp_path):
  start = time.monotonic()
  with pytest.raises(workdir_lock.WorkdirLocked, match='did not create the lock'):
    workdir_lock.WorkdirLock(str(tmp_path), run_id='r', is_primary=False,
                             join_timeout_s=0.3).acquire()
  assert time.monotonic() - start < 5


@pytest.mark.parametrize('previous', ['none', 'stale'])
def test_of_runs_starting_together_exactly_one_wins(tmp_path, previous):
  workdir, go = str(tmp_path / 'run'), str(tmp_path / 'go')
  if previous == 'stale':
    write_lock(workdir, pid=dead_pid())
  runs = [python('''
      import os, sys, time
      from twostage_jax.workdir import lock as workdir_lock
      workdir, go, done = sys.argv[1:]
      while not os.path.exists(go):
        time.sleep(0.001)
      try:
        lock = workdir_lock.WorkdirLock(workdir)
        lock.acquire()
      except workdir_lock.WorkdirLocked:
        print('refused', flush=True)
      else:
        print('won', flush=True)
        while not os.path.exists(done):
          time.sleep(0.01)
        lock.release()
      ''', workdir, go, str(tmp_path / 'done')) for _ in range(6)]
  time.sleep(1.0)  # let every interpreter start
  open(go, 'w').close()
  results = [run.stdout.readline().strip() for run in runs]
  open(tmp_path / 'done', 'w').close()
  for run in runs:
    assert run.wait(timeout=30) == 0, run.stderr.read()
  assert sorted(results) == ['refused'] * 5 + ['won'], results


def test_processes_of_one_run_that_all_create_share_the_lock(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path), run_id='shared'):
    late = workdir_lock.WorkdirLock(str(tmp_path), run_id='shared')  # is_primary too
    late.acquire()
    late.release()
    holder = workdir_lock.read_holder(str(tmp_path))
    assert (holder.run_id, holder.pid) == ('shared', os.getpid())
  assert workdir_lock.read_holder(str(tmp_path)) is None
