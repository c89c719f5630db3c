"""Orbax checkpoints of a training run: state arrays plus the run's config."""

import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp


class Checkpoints:
  """Checkpoints of one training run; keeps the newest `keep_checkpoints`.

  A checkpoint holds the state pytree (params, batch statistics, optimizer
  state, step) and the config as JSON, so a run can be inspected and resumed
  without the command line that started it.
  """

  def __init__(self, directory: str, train_config: ml_collections.ConfigDict,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=('state', 'config'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=train_config.keep_checkpoints,
            create=not read_only,
            read_only=read_only,
        ))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict) -> None:
    """Saves `state` as the checkpoint of `step` (in the background)."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config.to_dict()),
        ),
        force=True)

  def restore(self, step: int, target: Any) -> Any:
    """Restores the state at `step` into `target`'s structure.

    `target` holds arrays or jax.ShapeDtypeStruct; their shardings say where
    the restored arrays are placed.
    """
    if step not in self.all_steps():
      raise FileNotFoundError(
          f'no checkpoint for step {step} in {self.directory}; '
          f'available steps: {self.all_steps()}')
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return restored.state

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
