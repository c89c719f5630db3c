"""Evaluation on a category's test split: MVTec metrics per map, the report.

One row per map of the method, in its order (two-stage model: 'stage 1',
the coarse map, 'stage 2', the refined re-segmentation, and 'combined', the
final map, so a user sees what stage 2 adds), plus the method's own results
(Bauer's minimum-area protocol), then two reference rows that run no network
(`baselines`). Every metric of a row comes from one set of test maps,
computed once. Output in `<workdir>/eval/`: metrics.json, report.md,
roc.png, pro.png, examples.png.
"""

import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from twostage_jax import data
from twostage_jax.evaluation import baselines
from twostage_jax.evaluation import metrics
from twostage_jax.evaluation import report
from twostage_jax.inference import calibration
from twostage_jax.inference import engine
from twostage_jax.workdir import atomic_write
from twostage_jax.workdir import paths

_CURVE_POINTS = 1000  # plotted points per curve; the metrics use every point
PRO_MAX_FPR = 0.3  # the MVTec AD convention, which the report's column titles state


def row_metrics(maps: np.ndarray, scores: np.ndarray, test: data.TestSet
                ) -> dict[str, float]:
  """The MVTec metric suite of one map kind over a test split."""
  return {
      'pixel_auroc': metrics.auroc(maps, test.masks),
      'image_auroc': metrics.auroc(scores, test.labels),
      'pixel_aupro': metrics.aupro(maps, test.masks, PRO_MAX_FPR),
      'pixel_ap': metrics.average_precision(maps, test.masks),
      'pixel_f1_max': metrics.f1_max(maps, test.masks)[0],
      'image_f1_max': metrics.f1_max(scores, test.labels)[0],
      'pixel_iou_max': metrics.iou_max(maps, test.masks)[0],
  }


def _thin(curve: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """At most _CURVE_POINTS points of a monotone curve, ends kept, for plotting."""
  x, y = curve
  if len(x) <= _CURVE_POINTS:
    return x, y
  keep = np.unique(np.linspace(0, len(x) - 1, _CURVE_POINTS).astype(int))
  return x[keep], y[keep]


def _write_figures(out_dir: str, config: ml_collections.ConfigDict, test: data.TestSet,
                   maps: dict[str, np.ndarray], scores: dict[str, np.ndarray],
                   final: str, pixel_threshold: float, threshold_source: str
                   ) -> dict[str, str]:
  """roc.png, pro.png and, unless eval.num_examples is 0, examples.png.

  Returns:
    {title: file name} of the figures written.
  """
  category = config.category
  report.plot_roc(
      os.path.join(out_dir, 'roc.png'),
      {k: _thin(metrics.roc_curve(v, test.masks)) for k, v in maps.items()},
      {k: metrics.roc_curve(v, test.labels) for k, v in scores.items()},
      title=f'{category}: ROC')
  report.plot_pro(
      os.path.join(out_dir, 'pro.png'),
      {k: _thin(metrics.pro_curve(v, test.masks, PRO_MAX_FPR)) for k, v in maps.items()},
      PRO_MAX_FPR, title=f'{category}: per-region overlap')
  figures = {'ROC curves': 'roc.png', 'PRO curves': 'pro.png'}
  if config.eval.num_examples == 0:
    return figures
  indices = np.concatenate(report.select_examples(
      scores[final], test.labels, config.eval.num_examples))
  report.plot_examples(
      os.path.join(out_dir, 'examples.png'), test.images, test.masks, maps[final],
      scores[final], test.labels, list(test.paths), indices, pixel_threshold,
      title=f'{category}: worst and best test images ({final} map; pixel threshold '
            f'{pixel_threshold:.3g} from {threshold_source})')
  return {**figures, 'Test images': 'examples.png'}


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             model: engine.TrainedModel | None = None) -> dict[str, Any]:
  """Scores the test split; writes `<workdir>/eval/` and prints a table.

  Args:
    config: the run's config.
    workdir: the run's folder; its checkpoints are loaded unless `model`
      is given.
    model: trained variables to evaluate instead of the checkpoints.

  Returns:
    The category's results: steps, image counts, a metrics row per map, the
    reference rows (`baselines`) and the flagged rows, and the held-out
    thresholds (None when nothing was held out).
  """
  if model is None:
    model = engine.load_model(config, workdir)
  test = data.category_test_set(config)
  logging.info('evaluating %s (%s) on %d test images', config.category,
               ', '.join(f'{k} {v}' for k, v in model.steps.items()), len(test.images))
  maps, scores = engine.maps_and_scores(config, model, test.images)
  final = model.final_map
  held_out_maps, thresholds = None, None
  if config.calibration.holdout_fraction > 0:
    held_out = engine.maps_and_scores(config, model, data.training_images(config)[1])
    held_out_maps = held_out[0][final]
    thresholds = calibration.ensure_thresholds(config, workdir, model, held_out)
  references = {baselines.BASELINE: row_metrics(
      *baselines.constant_maps(config, model, len(test.images)), test)}
  if held_out_maps is not None:
    references[baselines.POSITION_ONLY] = row_metrics(
        *baselines.position_maps(config, held_out_maps, len(test.images)), test)
  rows = {k: row_metrics(maps[k], scores[k], test) for k in maps}
  results = {
      'category': config.category,
      **model.steps,
      'num_images': len(test.images),
      'num_anomalous': int(test.labels.sum()),
      'final_map': final,
      'rows': rows,
      'references': references,
      'flagged': report.flagged_rows(rows, references),
      'thresholds': thresholds,
  }
  results.update(model.method.extra_results(
      config, maps[final], test, held_out_maps))
  if jax.process_index() == 0:
    out_dir = paths.eval_dir(workdir)
    os.makedirs(out_dir, exist_ok=True)
    if thresholds is not None:
      pixel_threshold, source = thresholds['pixel'], 'held-out normal images'
    else:
      pixel_threshold = metrics.f1_max(maps[final], test.masks)[1]
      source = 'the best pixel F1 on the test set'
    figures = _write_figures(out_dir, config, test, maps, scores, final,
                             pixel_threshold, source)
    atomic_write.write_json(os.path.join(out_dir, 'metrics.json'), results)
    atomic_write.write_text(os.path.join(out_dir, 'report.md'),
                            report.markdown_report([results], f'Evaluation: {config.category}',
                                                   figures))
  print(report.format_table([results]), flush=True)
  return results
