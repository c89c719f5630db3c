"""Data-parallel train steps on the real input pipeline, in one or several processes.

Imported by tests/test_parallel.py for the single-process reference, and run
as a script by it for the multi-process case:

  python tests/parallel_steps.py CACHE_DIR OUT.npz COORDINATOR NUM_PROCESSES PROCESS_ID
"""

import functools
import sys


import jax
import ml_collections
import numpy as np
import optax

from configs import demo
from twostage_jax import data
from twostage_jax import methods
from twostage_jax import parallel
from twostage_jax import pipeline
from twostage_jax import train_state
from twostage_jax import train_step

# SGD makes the update linear in the averaged gradient, so parameters after
# the step compare at the precision of the gradient itself. (Adam divides
# each element by its own magnitude: see tests/test_parallel.py.)
SGD = optax.sgd(0.1)


def small_config(cache_dir: str) -> ml_collections.ConfigDict:
  config = demo.get_config()
  config.cache_dir = cache_dir
  config.image_size = 32
  config.model.width = 8
  config.demo.num_train = 16
  config.train.global_batch_size = 8
  return config


def keyed(variables) -> dict[str, np.ndarray]:
  """Every leaf of a variables tree by its path."""
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(variables)}


def assert_same_change(start: dict, a: dict, b: dict, num_steps: int) -> None:
  """Keyed variables a and b changed `start` alike, elementwise.

  Changes are compared elementwise to 1e-5 relative to the largest change in
  their array: a gradient element is a sum over every pixel of the batch, so
  one that nearly cancels carries the rounding of the large terms, which no
  elementwise relative tolerance bounds.
  """
  assert a.keys() == b.keys() == start.keys()
  for name in a:
    change_a, change_b = a[name] - start[name], b[name] - start[name]
    # Plus one unit in the last place of the stored value: parameters are
    # float32, so their change is only known to that precision.
    # The rounding of each step's gradient adds up over the steps.
    bound = (1e-5 * np.abs(change_b) + 1e-5 * num_steps * np.abs(change_b).max()
             + np.spacing(np.abs(b[name])))
    worst = np.abs(change_a - change_b) / bound
    assert worst.max() <= 1.0, f'{name}: off by {worst.max():.2f}x the tolerance'


def initial_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation | None):
  state = train_state.create_train_state(config, train_state.prng_key(0))
  if tx is not None:
    state = state.replace(tx=tx, opt_state=tx.init(state.params))
  return state


def run(config: ml_collections.ConfigDict, num_steps: int,
        tx: optax.GradientTransformation | None = SGD,
        mesh: jax.sharding.Mesh | None = None) -> tuple[dict, list[float]]:
  """Trains `num_steps` on pipeline batches; returns host variables and losses.

  Each process builds only its own slice of every global batch.
  """
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
  state = jax.device_put(initial_state(config, tx), parallel.replicated(mesh))
  step_fn = parallel.data_parallel(
      functools.partial(train_step.train_step,
                        objective=methods.get(config.method).objective(config, 1)), mesh)
  losses = []
  for step in range(num_steps):
    batch = pipeline.build_batch(images, sample, plan, step)
    state, metrics = step_fn(state, parallel.to_global_batch(batch, mesh),
                             train_state.prng_key(step))
    losses.append(float(parallel.to_host(metrics['loss'])))
  variables = parallel.to_host({'params': state.params, 'batch_stats': state.batch_stats})
  return variables, losses


def main(argv: list[str]) -> None:
  cache_dir, out, coordinator, num_processes, process_id = argv[1:]
  parallel.initialize_distributed(ml_collections.ConfigDict({
      'enabled': True, 'coordinator_address': coordinator,
      'num_processes': int(num_processes), 'process_id': int(process_id)}))
  variables, losses = run(small_config(cache_dir), num_steps=1)
  if jax.process_index() == 0:
    leaves = {jax.tree_util.keystr(p): v
              for p, v in jax.tree_util.tree_leaves_with_path(variables)}
    np.savez(out, losses=np.array(losses), **leaves)


if __name__ == '__main__':
  main(sys.argv)
