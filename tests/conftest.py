"""Test setup: 8 simulated CPU devices, and one scratch folder for the whole session.

The tests import the installed package (`pip install -e .`, which README's
install line does), never a path of their own.

Everything here is set before JAX initialises, and child processes (main.py
runs, a second JAX process, pytest-xdist's workers) inherit it:
- XLA_FLAGS gets 8 simulated devices, keeping what else it holds (run the
  suite under `XLA_FLAGS=--xla_cpu_max_isa=AVX2` to compute with another
  processor's kernels);
- XLA compiles for speed of compiling (tests/compile_speed.py), unless
  XLA_FLAGS sets the options itself;
- the demo datasets and anomaly-source stores go to one cache folder for the
  session ($TWOSTAGE_JAX_CACHE), built once and shared by every test that
  does not test the cache itself, never to the user's ~/.cache;
- compiled programs go to one persistent compilation cache for the session:
  the many tiny runs of the suite compile the same programs again (each run,
  each child process), and loading one is 10-100x faster than compiling it.
"""

import os
import shutil
import tempfile

import child_process  # tests/child_process.py
import compile_speed  # tests/compile_speed.py

os.environ['XLA_FLAGS'] = child_process.xla_flags(
    8, compile_speed.xla_flags(os.environ.get('XLA_FLAGS', '')))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

_SESSION_VARIABLE = 'TWOSTAGE_JAX_TEST_SESSION'
# The first process of a session (pytest, or xdist's controller) makes the
# folder and removes it at the end; its workers inherit the variable.
_OWNS_SESSION_FOLDER = _SESSION_VARIABLE not in os.environ
if _OWNS_SESSION_FOLDER:
  os.environ[_SESSION_VARIABLE] = tempfile.mkdtemp(prefix='twostage_jax_tests_')
SESSION_FOLDER = os.environ[_SESSION_VARIABLE]

os.environ['TWOSTAGE_JAX_CACHE'] = os.path.join(SESSION_FOLDER, 'cache')
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(SESSION_FOLDER, 'compiled')
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'


def pytest_unconfigure(config):
  del config
  if _OWNS_SESSION_FOLDER:
    shutil.rmtree(SESSION_FOLDER, ignore_errors=True)


# Session fixtures of tests/tiny_runs.py, imported after the environment above is set.
from tiny_runs import two_stage_run  # pylint: disable=wrong-import-position,unused-import
