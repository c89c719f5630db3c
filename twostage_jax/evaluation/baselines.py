"""Reference rows that use no trained network, printed beside every method's rows.

- `baseline`: every map of the method set to one constant, then the method's
  own combination (`Method.combine`), smoothing and score rule. Its pixel and
  image AUROC read 0.5 unless the post-processing itself favours some
  positions, the prior a zero-padded filter puts on the middle of the image.
- `position only`: the mean final map of the held-out normal images, given to
  every test image. It shows how much of a row is where things usually are
  (a reconstruction error that outlines the object scores well on defects that
  lie on the object), which no post-processing removes.

The report flags a method row that is not above them (`report.flagged_rows`).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from twostage_jax.evaluation.report import BASELINE
from twostage_jax.evaluation.report import POSITION_ONLY
from twostage_jax.inference import engine

_CONSTANT = 0.5  # the value of every map in the baseline row; any value reads the same


def constant_maps(config: ml_collections.ConfigDict, model: engine.TrainedModel,
                  count: int) -> tuple[np.ndarray, np.ndarray]:
  """The `baseline` row's (count, S, S) final maps and (count,) image scores.

  Every map the method names for the trained stages is the same constant;
  the method combines them, and the final map is smoothed and scored as
  a network's would be. All images get the same map: no network runs.
  """
  method = model.method
  size = config.image_size
  names = method.map_names(config, model.trained)

  def final_map(value: jax.Array) -> tuple[jax.Array, jax.Array]:
    constant = {name: jnp.full((1, size, size), value, jnp.float32) for name in names}
    smoothed = engine.smooth(method.combine(config, constant)[model.final_map],
                                config.eval.map_sigma)
    return smoothed, engine.score_fn(config)(smoothed)

  maps, scores = jax.jit(final_map)(jnp.float32(_CONSTANT))
  return (np.broadcast_to(np.asarray(maps), (count, size, size)),
          np.broadcast_to(np.asarray(scores), (count,)))


def position_maps(config: ml_collections.ConfigDict, held_out_maps: np.ndarray,
                  count: int) -> tuple[np.ndarray, np.ndarray]:
  """The `position only` row's maps and scores: the held-out images' mean map for all.

  Args:
    config: the run's config (its score rule scores the mean map).
    held_out_maps: (M, S, S) final maps of the held-out normal images, as
      reported (smoothed).
    count: the number of test images.
  """
  mean = held_out_maps.mean(axis=0, dtype=np.float64).astype(np.float32)[None]
  score = engine.image_scores(config, {POSITION_ONLY: mean})[POSITION_ONLY]
  return (np.broadcast_to(mean, (count,) + mean.shape[1:]),
          np.broadcast_to(score, (count,)))

