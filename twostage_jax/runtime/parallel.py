"""Data parallelism: device mesh, the shard_map step wrapper, multi-host start.

The per-device step is written in the pmap style (collectives over the named
`data` axis); `data_parallel` runs it with `jax.shard_map` under `jax.jit`,
which is what `jax.pmap` has become. Parallelism wraps the step; the step
itself never looks at the mesh.
"""

from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Name of the mapped device axis; batch statistics (BatchNorm) are averaged over it.
DATA_AXIS = 'data'


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Joins a multi-process run when `config.enabled`; a no-op otherwise."""
  if not config.enabled:
    return
  jax.distributed.initialize(
      coordinator_address=config.coordinator_address or None,
      num_processes=config.num_processes if config.num_processes > 0 else None,
      process_id=config.process_id if config.process_id >= 0 else None,
  )


def make_mesh() -> Mesh:
  """A one-axis mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,))


class BatchSizeError(ValueError):
  """A global batch that the run's devices cannot share evenly."""


def local_batch_size(global_batch_size: int) -> int:
  """This process's share of a global batch.

  Raises:
    BatchSizeError: naming both numbers, if the devices cannot share it evenly.
  """
  devices = jax.device_count()
  if global_batch_size % devices:
    raise BatchSizeError(
        f'global batch size {global_batch_size} does not divide by the '
        f'{devices} devices of this run; choose a multiple of {devices}.')
  return global_batch_size // jax.process_count()


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def to_global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles each process's slice into global arrays split along `data`."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def data_parallel(step: Callable[..., Any], mesh: Mesh,
                  compiler_options: dict[str, Any] | None = None) -> Callable[..., Any]:
  """Runs `step(state, batch, key)` on every device of `mesh` at once.

  The state and key are replicated, the batch is split along `data`. The
  step is written in the pmap style (explicit `pmean` of gradients), so
  shard_map's varying-value tracking is off: with it on, differentiating
  replicated parameters would already sum gradients over devices. The step
  must leave its outputs identical on all devices. `compiler_options` go to
  XLA (see xla_options.py).
  """
  mapped = jax.shard_map(
      step, mesh=mesh,
      in_specs=(P(), P(DATA_AXIS), P()),
      out_specs=(P(), P()),
      check_vma=False)
  return jax.jit(mapped, donate_argnums=0, compiler_options=compiler_options or None)


def per_shard(fn: Callable[[Any, Any], Any], mesh: Mesh,
              compiler_options: dict[str, Any] | None = None) -> Callable[[Any, Any], Any]:
  """Runs `fn(replicated, batch) -> batched` on each device's share of the batch.

  For per-sample work with no communication between devices (inference,
  stage 2's refinement): every device computes its own rows. Nothing is
  differentiated or reduced across devices, so varying-value tracking is off:
  it would reject loops (device SLIC) whose carries start from constants.
  """
  mapped = jax.shard_map(
      fn, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS), check_vma=False)
  return jax.jit(mapped, compiler_options=compiler_options or None)


def to_host(tree: Any) -> Any:
  """NumPy copies of (possibly multi-process) replicated arrays."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))
