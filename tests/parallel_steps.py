"""Data-parallel train steps on the real input pipeline, in one or several processes.

Imported by the tests of data parallelism for the comparison of two layouts
of one step, and run as a script by tests/test_parallel.py for the
multi-process case:

  python tests/parallel_steps.py CACHE_DIR OUT.npz COORDINATOR NUM_PROCESSES PROCESS_ID

Why the comparisons run in float64, and the tolerance they use
----------------------------------------------------------------
Two layouts of one step (8 devices and 1, 2 processes and 1) compute the
same sums in different orders. In float32 the rounding that this reorders
(2^-24 of each operand) is amplified by the tiny random networks of the
tests: BatchNorm over channels that are nearly constant after a ReLU divides
it by variances near 0, and a pre-activation within rounding of 0 flips its
ReLU. The layouts then differ by anything up to a few percent of the step
(2.4% on one processor for AnoSeg's stage 2), depending on which kernels
XLA picks for the processor, so no float32 tolerance both holds everywhere
and catches an error. Run in float64 (`model.compute_dtype = 'float64'` and
a float64 state: the same computation with 29 more bits), the same
amplification acts on 2^-53 instead: even an amplification that made the
float32 layouts differ by 100% of the step (a factor 2^24 on the rounding)
leaves the float64 ones 2^-29 = 1.9e-9 apart. LAYOUT_TOLERANCE is 5x that.
A step that averaged over the wrong devices, or took the wrong samples,
differs like a step on another batch: the tests measure that yardstick
(`assert_changed_unlike`) at 5e-2 of the step or more, 5 million times the
tolerance.
"""

import functools
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import demo
from twostage_jax import data
from twostage_jax import methods
from twostage_jax.runtime import parallel
from twostage_jax.runtime import pipeline
from twostage_jax.training import train_state
from twostage_jax.training import train_step

# SGD makes the update linear in the averaged gradient, so parameters after
# the step compare at the precision of the gradient itself. (Adam divides
# each element by its own magnitude: see tests/test_parallel.py.)
SGD_RATE = 0.1
SGD = optax.sgd(SGD_RATE)

# See the module docstring: 5 x 2^-29.
LAYOUT_TOLERANCE = 1e-8

# The least distance, relative to the step, of a step on another batch: what
# an error of the data-parallel layout looks like.
YARDSTICK = 5e-2

COLLECTIONS = ("['params']", "['batch_stats']")


def small_config(cache_dir: str) -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.cache_dir = cache_dir
  config.image_size = 32
  config.model.width = 8
  config.demo.num_train = 16
  config.train.global_batch_size = 8
  return config


def float64(tree):
  """`tree` with its floating arrays in float64; call it under `jax.enable_x64(True)`."""
  def widen(x):
    x = jnp.asarray(x)
    return x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(widen, tree)


def keyed(variables) -> dict[str, np.ndarray]:
  """Every leaf of a variables tree by its path."""
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(variables)}


def distance(a: dict, b: dict, names: Sequence[str]) -> float:
  """Euclidean distance of keyed variables a and b over `names`, in float64."""
  return float(np.sqrt(sum(np.sum((np.asarray(a[n], np.float64) - b[n]) ** 2) for n in names)))


def groups(keyed_variables: dict, prefixes: Sequence[str] = COLLECTIONS) -> dict[str, list]:
  """The names under each prefix (a network, a collection), leaving out empty groups."""
  found = {p: [n for n in keyed_variables if n.startswith(p)] for p in prefixes}
  return {p: names for p, names in found.items() if names}


def assert_same_change(start: dict, got: dict, want: dict,
                       prefixes: Sequence[str] = COLLECTIONS,
                       tolerance: float = LAYOUT_TOLERANCE) -> None:
  """Every array of `got` changed `start` as `want` did, to `tolerance` of its group's change.

  Each array's distance is measured against the norm of its whole group's
  change (a network's parameters, its BatchNorm statistics): an array whose
  exact change is 0 (a bias in front of BatchNorm) has only rounding to
  compare, which no tolerance relative to that array itself bounds.
  """
  assert got.keys() == want.keys() == start.keys()
  for prefix, names in groups(want, prefixes).items():
    change = distance(want, start, names)
    assert change > 0, f'{prefix}: the step changed nothing'
    for name in names:
      off = distance(got, want, [name]) / change
      assert off <= tolerance, f'{name}: off by {off:.3g} of the step, tolerance {tolerance:.0e}'


def assert_changed_unlike(start: dict, wrong: dict, want: dict,
                          prefixes: Sequence[str] = COLLECTIONS) -> None:
  """`wrong` (a step on another batch) is at least YARDSTICK of the step away from `want`."""
  for prefix, names in groups(want, prefixes).items():
    off = distance(wrong, want, names) / distance(want, start, names)
    assert off > YARDSTICK, f'{prefix}: the yardstick step is only {off:.3g} away'


def initial_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation | None):
  state = train_state.create_train_state(methods.get(config.method), config,
                                         train_state.prng_key(0))
  if tx is not None:
    state = state.replace(tx=tx, opt_state=tx.init(state.params))
  return state


def run(config: ml_collections.ConfigDict, num_steps: int,
        tx: optax.GradientTransformation | None = SGD,
        mesh: jax.sharding.Mesh | None = None,
        batch_offset: int = 0) -> tuple[dict, list[float]]:
  """Trains `num_steps` in float64 on pipeline batches; returns host variables and losses.

  Each process builds only its own slice of every global batch.
  `batch_offset` starts at another batch of the stream (the yardstick).
  """
  with jax.enable_x64(True):
    config = config.copy_and_resolve_references()
    config.model.compute_dtype = 'float64'
    mesh = mesh or parallel.make_mesh()
    images = data.load_train_images(data.resolve_data_dir(config), config.category,
                                    config.image_size)
    plan = pipeline.BatchPlan(
        num_images=len(images),
        global_batch_size=config.train.global_batch_size,
        local_batch_size=config.train.global_batch_size // jax.process_count(),
        process_index=jax.process_index(),
        seed=config.seed,
        stream=1)
    sample = methods.get(config.method).sampler_factory(config, 1, images)()
    state = jax.device_put(float64(initial_state(config, tx)), parallel.replicated(mesh))
    step_fn = parallel.data_parallel(
        functools.partial(train_step.train_step,
                          objective=methods.get(config.method).objective(config, 1)), mesh)
    losses = []
    for step in range(num_steps):
      batch = pipeline.build_batch(images, sample, plan, step + batch_offset)
      state, metrics = step_fn(state, parallel.to_global_batch(batch, mesh),
                               train_state.prng_key(step))
      losses.append(float(parallel.to_host(metrics['loss'])))
    variables = parallel.to_host({'params': state.params, 'batch_stats': state.batch_stats})
  return variables, losses


def initial_variables(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Keyed float64 variables `run` starts from."""
  with jax.enable_x64(True):
    state = float64(initial_state(config, None))
    return keyed({'params': state.params, 'batch_stats': state.batch_stats})


def main(argv: list[str]) -> None:
  cache_dir, out, coordinator, num_processes, process_id = argv[1:]
  parallel.initialize_distributed(ml_collections.ConfigDict({
      'enabled': True, 'coordinator_address': coordinator,
      'num_processes': int(num_processes), 'process_id': int(process_id)}))
  variables, losses = run(small_config(cache_dir), num_steps=1)
  if jax.process_index() == 0:
    np.savez(out, losses=np.array(losses), **keyed(variables))


if __name__ == '__main__':
  main(sys.argv)
