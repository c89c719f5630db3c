"""Orbax checkpoints of a training run: state arrays plus the run's config.

A checkpoint that cannot be read back (a truncated array file, an emptied
metadata file) must not end a run with a raw Orbax or JSON traceback naming
no file: `restore` names the damaged checkpoint folder, and `restore_latest`
falls back to the newest checkpoint that can still be read.
"""

import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from absl import logging

_STATE = 'state'
_CONFIG = 'config'
_PROVENANCE = 'provenance'
# Long Orbax/TensorStore messages end in a JSON spec of the store; the part
# before it says what failed and where.
_TENSORSTORE_SPEC = ' [tensorstore_spec'
_MAX_MESSAGE_CHARS = 400


class DamagedCheckpointError(OSError):
  """A checkpoint folder exists but cannot be read back; the message names it."""


def _describe(error: Exception) -> str:
  """The error's type and the readable head of its message, on one line."""
  message = str(error).split(_TENSORSTORE_SPEC, 1)[0]
  message = ' '.join(message.split())
  if len(message) > _MAX_MESSAGE_CHARS:
    message = message[:_MAX_MESSAGE_CHARS] + '...'
  return f'{type(error).__name__}: {message}'


class Checkpoints:
  """Checkpoints of one training run; keeps the newest `keep_checkpoints`.

  A checkpoint holds the state pytree (params, batch statistics, optimizer
  state, step), the config as JSON, so a run can be inspected and resumed
  without the command line that started it, and optionally a provenance JSON
  (e.g. which stage-1 checkpoint a stage 2 was trained on).
  """

  def __init__(self, directory: str,
               train_config: ml_collections.ConfigDict | None = None,
               read_only: bool = False):
    """Opens (or, unless `read_only`, creates) the checkpoint folder.

    Args:
      directory: the folder holding one sub-folder per step.
      train_config: the config's `train` part; its `keep_checkpoints` bounds
        how many checkpoints are kept. Needed unless `read_only`.
      read_only: open without creating or deleting anything.
    """
    if train_config is None and not read_only:
      raise ValueError('Checkpoints needs train_config (keep_checkpoints) to write')
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        item_names=(_STATE, _CONFIG, _PROVENANCE),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else train_config.keep_checkpoints,
            create=not read_only,
            read_only=read_only,
            # Lists the step folders without reading each step's metadata
            # file, so a damaged one cannot stop the listing; nothing here
            # uses the commit times or metrics that file holds.
            lightweight_initialize=True,
        ))

  def latest_step(self) -> int | None:
    """The newest step with a checkpoint folder (intact or not), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> str:
    """The folder of the checkpoint of `step` (named in error messages)."""
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict,
           provenance: dict[str, Any] | None = None) -> None:
    """Saves `state` as the checkpoint of `step` (in the background).

    A checkpoint already at `step` is replaced: a run that resumed from an
    older checkpoint, because the newer one was damaged, recomputes it.

    Args:
      step: the training step the state is at.
      state: the pytree of arrays to save.
      config: the run's config, stored as JSON beside the state.
      provenance: JSON-serialisable facts about where the state came from,
        read back with `provenance(step)`.
    """
    if step in self.all_steps():
      logging.warning('replacing the checkpoint %s', self.step_dir(step))
      self._manager.wait_until_finished()
      self._manager.delete(step)
    items = {_STATE: ocp.args.StandardSave(state),
             _CONFIG: ocp.args.JsonSave(config.to_dict())}
    if provenance is not None:
      items[_PROVENANCE] = ocp.args.JsonSave(provenance)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def _read(self, step: int, what: str, **items: Any) -> ocp.args.Composite:
    """Restores `items` of the checkpoint of `step`, naming its folder on failure."""
    if step not in self.all_steps():
      raise FileNotFoundError(
          f'no checkpoint for step {step} in {self.directory}; '
          f'available steps: {self.all_steps()}')
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as error:  # Orbax, TensorStore and json raise many kinds.
      raise DamagedCheckpointError(
          f'cannot read the {what} of the checkpoint {self.step_dir(step)} '
          f'(damaged, or not written for this model): {_describe(error)}') from error

  def restore(self, step: int, target: Any) -> Any:
    """Restores the state at `step` into `target`'s structure.

    `target` holds arrays or jax.ShapeDtypeStruct; their shardings say where
    the restored arrays are placed.

    Raises:
      FileNotFoundError: there is no checkpoint of `step`.
      DamagedCheckpointError: naming the step's folder, if it cannot be read.
    """
    return self._read(step, 'state', **{_STATE: ocp.args.StandardRestore(target)})[_STATE]

  def restore_latest(self, target: Any) -> tuple[Any, int] | None:
    """Restores the newest checkpoint that can be read, and its step.

    A checkpoint that cannot be read is skipped with a warning naming its
    folder and the error, so one damaged save costs the steps since the
    previous one instead of the whole run.

    Returns:
      (state, step), or None if the folder holds no checkpoint at all.

    Raises:
      DamagedCheckpointError: no checkpoint can be read; names every folder.
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        return self.restore(step, target), step
      except DamagedCheckpointError as error:
        logging.warning('%s; trying the previous checkpoint', error)
        failures.append(str(error))
    if not failures:
      return None
    raise DamagedCheckpointError(
        f'no checkpoint in {self.directory} can be restored:\n  ' + '\n  '.join(failures))

  def config(self, step: int) -> dict[str, Any]:
    """The config (as a plain dict) stored with the checkpoint of `step`."""
    return self._read(step, 'config', **{_CONFIG: ocp.args.JsonRestore()})[_CONFIG]

  def provenance(self, step: int) -> dict[str, Any] | None:
    """The provenance saved with `step`; None if it was saved without one."""
    if step in self.all_steps() and not os.path.isdir(
        os.path.join(self.step_dir(step), _PROVENANCE)):
      return None
    return self._read(step, 'provenance',
                      **{_PROVENANCE: ocp.args.JsonRestore()})[_PROVENANCE]

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
