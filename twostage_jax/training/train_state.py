"""A stage's training state: creating it, its abstract shape, restoring it from a workdir.

Each stage keeps its own checkpoints under `<workdir>/checkpoints/stage<n>`,
so either stage can resume on its own and inference can pick any pair.
"""

import os
from typing import Any

import jax
import ml_collections

from twostage_jax.methods import base
from twostage_jax.runtime import parallel
from twostage_jax.training import network_state
from twostage_jax.workdir import checkpoints as checkpoints_lib
from twostage_jax.workdir import paths

Variables = network_state.Variables


def prng_key(seed: int) -> jax.Array:
  """A PRNG key of the 'rbg' kind.

  XLA:CPU takes about 2 s to compile each threefry draw, which made the
  initialisation of the network compile for 20-30 s; rbg keys compile in
  a fraction of that. Their streams are deterministic for a given backend.
  """
  return jax.random.key(seed, impl='rbg')


def create_train_state(method: base.Method, config: ml_collections.ConfigDict,
                       key: jax.Array, stage: int = 1) -> Any:
  """Fresh state of `stage` of `method` (`Method.create_state`)."""
  return method.create_state(config, key, stage)


def abstract_train_state(method: base.Method, config: ml_collections.ConfigDict,
                         mesh: jax.sharding.Mesh, stage: int = 1) -> Any:
  """Shapes, dtypes and replicated shardings of `stage`'s state, for restoring.

  The restored state keeps this one's optimizer, whose schedule depends on
  the stage's number of steps.
  """
  shapes = jax.eval_shape(lambda: create_train_state(method, config, prng_key(0), stage))
  sharding = parallel.replicated(mesh)
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def variables_of(state: Any) -> Variables:
  """What inference needs of a state: params and BatchNorm statistics."""
  return {'params': state.params, 'batch_stats': state.batch_stats}


def has_checkpoint(workdir: str, stage: int) -> bool:
  folder = paths.stage_checkpoints(workdir, stage)
  return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def has_checkpoint_at(workdir: str, stage: int, step: int) -> bool:
  return os.path.isdir(os.path.join(paths.stage_checkpoints(workdir, stage), str(step)))


def restore_state(method: base.Method, config: ml_collections.ConfigDict, workdir: str,
                  stage: int, mesh: jax.sharding.Mesh, step: int = -1) -> tuple[Any, int]:
  """The state of `stage` at `step` (-1: the newest intact one), replicated over `mesh`.

  Raises:
    FileNotFoundError: naming the folder searched, if there is no checkpoint.
  """
  checkpoints = checkpoints_lib.Checkpoints(
      paths.stage_checkpoints(workdir, stage), config.train, read_only=True)
  try:
    target = abstract_train_state(method, config, mesh, stage)
    if step >= 0:
      return checkpoints.restore(step, target), step
    restored = checkpoints.restore_latest(target)
    if restored is None:
      raise FileNotFoundError(
          f'no stage-{stage} checkpoint in {checkpoints.directory} (workdir '
          f'{os.path.abspath(workdir)}); train it first (--mode=train) or point '
          '--workdir at a trained run')
    return restored
  finally:
    checkpoints.close()


def provenance(config: ml_collections.ConfigDict, workdir: str, stage: int,
               step: int) -> dict[str, Any]:
  """What the checkpoint of `stage` at `step` was trained on ({} if it does not say)."""
  checkpoints = checkpoints_lib.Checkpoints(
      paths.stage_checkpoints(workdir, stage), config.train, read_only=True)
  try:
    return checkpoints.provenance(step) or {}
  finally:
    checkpoints.close()
