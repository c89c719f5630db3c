"""Evaluation reports: console and Markdown tables, ROC/PRO plots, example grids.

Everything here works on plain results dicts and NumPy arrays, so reports can
be rebuilt from saved results without a model. Plots use matplotlib Figure
objects directly (no pyplot), so nothing depends on a display or global state.
"""

import os
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

# (results key, column title), in table order.
METRIC_COLUMNS = (
    ('pixel_auroc', 'pixel AUROC'),
    ('image_auroc', 'image AUROC'),
    ('pixel_aupro', 'AUPRO@0.3'),
    ('pixel_ap', 'pixel AP'),
    ('pixel_f1_max', 'pixel F1'),
    ('image_f1_max', 'image F1'),
    ('pixel_iou_max', 'IoU'),
)

# The reference rows beside every method's rows (baselines.py).
BASELINE = 'baseline'
POSITION_ONLY = 'position only'
FLOOR = 0.55  # an AUROC below it is near chance (0.5): the row is flagged
_FLAGGED_METRICS = (('pixel_auroc', 'pixel AUROC'), ('image_auroc', 'image AUROC'))

_ROW_EXPLANATIONS = {
    'autoencoder': ("Bauer's autoencoder: the squared reconstruction error "
                    'averaged over the channels, Gaussian-smoothed.'),
    'stage 1': 'the coarse anomaly map of the stage-1 network.',
    'stage 2': ('the re-segmentation by stage 2, restricted to the SLIC '
                'superpixels that stage 1 flagged.'),
    'combined': ("the final map, built from both stages by the config's "
                 '`refine.combine` rule (their sum by default).'),
    BASELINE: ('no network: every map set to one constant, then the '
                 "method's own combination, smoothing and score rule. Its "
                 'AUROCs read 0.5 unless the post-processing favours some '
                 'positions.'),
    POSITION_ONLY: ('no network: the mean final map of the held-out normal '
                      'images, given to every test image. What knowing where '
                      'things usually are scores; a method row should be above it.'),
}

_DPI = 100
_CELL_INCHES = 2.2
_EXAMPLE_COLUMNS = ('image', 'ground truth', 'anomaly map', 'map >= threshold')


_Row = tuple[str, str, list[float]]


def _named_rows(result: dict[str, Any]) -> dict[str, dict[str, float]]:
  """A category's method rows, then its reference rows (baselines)."""
  return {**result['rows'], **result.get('references', {})}


def _table_rows(results: Sequence[dict[str, Any]]) -> tuple[list[_Row], list[_Row]]:
  """(category, row name, metric values) per category and row, and the means.

  Means cover the row names every category has, in the first category's
  order, and are only given for more than one category.
  """
  if not results:
    raise ValueError('no results to report')
  rows = [(result['category'], name, [values[key] for key, _ in METRIC_COLUMNS])
          for result in results for name, values in _named_rows(result).items()]
  means = []
  if len(results) > 1:
    shared = [name for name in _named_rows(results[0])
              if all(name in _named_rows(result) for result in results)]
    means = [('mean', name,
              [float(np.mean([_named_rows(result)[name][key] for result in results]))
               for key, _ in METRIC_COLUMNS]) for name in shared]
  return rows, means


def flagged_rows(rows: dict[str, dict[str, float]],
                 references: dict[str, dict[str, float]]) -> dict[str, str]:
  """{row name: why} for the method rows near chance or not above `position only`."""
  position = references.get(POSITION_ONLY)
  flags = {}
  for name, row in rows.items():
    reasons = []
    for key, title in _FLAGGED_METRICS:
      if row[key] < FLOOR:
        reasons.append(f'{title} {row[key]:.4f} below {FLOOR}')
      elif position is not None and row[key] <= position[key]:
        reasons.append(f'{title} {row[key]:.4f} not above {POSITION_ONLY} '
                       f'({position[key]:.4f})')
    if reasons:
      flags[name] = '; '.join(reasons)
  return flags


def _flags(results: Sequence[dict[str, Any]]) -> list[str]:
  """'category, row: why' for every flagged method row."""
  return [f"{result['category']}, {name}: {why}"
          for result in results for name, why in result.get('flagged', {}).items()]


def format_table(results: Sequence[dict[str, Any]]) -> str:
  """Console table: one line per (category, row), then means over categories.

  Flagged rows end in '!' and are explained below the table.

  Raises:
    ValueError: if `results` is empty.
  """
  rows, means = _table_rows(results)
  flagged = {(r['category'], name) for r in results for name in r.get('flagged', {})}
  category_width = max([12] + [len(category) + 2 for category, _, _ in rows])
  map_width = max([10] + [len(name) + 2 for _, name, _ in rows])
  header = f'{"category":<{category_width}}{"map":<{map_width}}' + ''.join(
      f'{column:>13}' for _, column in METRIC_COLUMNS)

  def line(category: str, name: str, values: list[float]) -> str:
    mark = '  !' if (category, name) in flagged else ''
    return f'{category:<{category_width}}{name:<{map_width}}' + ''.join(
        f'{value:>13.4f}' for value in values) + mark

  lines = [header, '-' * len(header)] + [line(*row) for row in rows]
  if means:
    lines += ['-' * len(header)] + [line(*row) for row in means]
  lines += [f'! {flag}' for flag in _flags(results)]
  for result in results:
    if result.get('area_protocol'):
      p = result['area_protocol']
      lines.append(
          f"{result['category']}: Bauer's protocol (min area {p['min_area']} px, threshold "
          f"{p['threshold']:.4g}): TPR {p['tpr']:.4f}  TNR {p['tnr']:.4f}  mean "
          f"{p['mean_tpr_tnr']:.4f}  image F1 {p['image_f1']:.4f}  pixel F1 {p['pixel_f1']:.4f}")
  return '\n'.join(lines)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]],
                    right_from: int) -> list[str]:
  """Markdown table lines; columns from `right_from` on are right-aligned."""
  align = ['---' if i < right_from else '---:' for i in range(len(header))]
  return ['| ' + ' | '.join(str(cell) for cell in row) + ' |'
          for row in (header, align, *rows)]


def _step(value: int | None) -> str:
  """A checkpoint step for the table; '-' for a stage that was not trained."""
  return '-' if value is None else str(value)


def markdown_report(results: Sequence[dict[str, Any]], title: str,
                    figures: dict[str, str] | None = None) -> str:
  """report.md text: what the rows mean, metrics, checkpoints, thresholds, figures.

  Args:
    results: per-category results dicts, as written by the evaluation.
    title: the report's top-level heading.
    figures: figure name -> path relative to the report, embedded in order.

  Raises:
    ValueError: if `results` is empty.
  """
  rows, means = _table_rows(results)
  flagged = {(r['category'], name) for r in results for name in r.get('flagged', {})}
  row_names = list(dict.fromkeys(name for r in results for name in _named_rows(r)))
  lines = [f'# {title}', '', 'Rows of the tables:', '']
  lines += [f'- **{name}**: {_ROW_EXPLANATIONS[name]}'
            for name in row_names if name in _ROW_EXPLANATIONS]
  lines += [
      '',
      ('Pixel metrics pool all test pixels of a category; the image score '
       'follows `eval.score_rule` (the papers\' rule: the maximum of the '
       'mean-filtered anomaly map). AUPRO integrates the '
       'per-region overlap up to FPR 0.3 and divides by 0.3. F1 and IoU are '
       'at the best threshold on the test set (an upper bound, not a '
       'deployable operating point).'),
      '',
      '## Metrics',
      '',
  ]
  lines += _markdown_table(
      ['category', 'map'] + [column for _, column in METRIC_COLUMNS],
      [(category, f'{name} (flagged)' if (category, name) in flagged else name,
        *(f'{value:.4f}' for value in values))
       for category, name, values in rows]
      + [('**mean**', name, *(f'{value:.4f}' for value in values))
         for _, name, values in means], right_from=2)
  flags = _flags(results)
  if flags:
    lines += ['', (f'Flagged: a method row whose pixel or image AUROC is below '
                   f'{FLOOR} or not above the position-only row:'), '']
    lines += [f'- {flag}' for flag in flags]
  lines += ['', '## Checkpoints and test set', '']
  stages = sorted({int(match[1]) for r in results for key in r
                   if (match := re.fullmatch(r'stage(\d+)_step', key))})
  lines += _markdown_table(
      ['category', *(f'stage-{stage} step' for stage in stages), 'test images', 'anomalous'],
      [(r['category'], *(_step(r.get(f'stage{stage}_step')) for stage in stages),
        r['num_images'], r['num_anomalous']) for r in results], right_from=1)
  with_thresholds = [r for r in results if r.get('thresholds')]
  if with_thresholds:
    lines += [
        '', '## Decision thresholds', '',
        ('An image is flagged when its score is >= the image threshold, a '
         'pixel when its map value is >= the pixel threshold. The thresholds '
         'come from held-out train/good images that were not used for '
         'training; the test set is never used to choose them. The image '
         'threshold is a quantile of their image scores, the pixel threshold '
         'a quantile of all their map values (`calibration` in the config).'), '',
    ]
    lines += _markdown_table(
        ['category', 'map', 'image threshold', 'image quantile', 'pixel threshold',
         'pixel quantile', 'held-out images'],
        [(r['category'], r['thresholds']['map'], f"{r['thresholds']['image']:.4g}",
          f"{r['thresholds']['image_quantile']:g}", f"{r['thresholds']['pixel']:.4g}",
          f"{r['thresholds']['pixel_quantile']:g}",
          r['thresholds']['num_holdout_images']) for r in with_thresholds],
        right_from=2)
  with_protocol = [r for r in results if r.get('area_protocol')]
  if with_protocol:
    lines += [
        '', "## Bauer's minimum-area protocol", '',
        ('The map threshold is the lowest at which no held-out normal image has '
         'a thresholded component of the minimum defect area; a test image is '
         'defective when it has one, and its defect pixels are those components.'), '',
    ]
    lines += _markdown_table(
        ['category', 'min area (px)', 'threshold', 'TPR', 'TNR', 'mean', 'image F1',
         'pixel F1'],
        [(r['category'], r['area_protocol']['min_area'],
          f"{r['area_protocol']['threshold']:.4g}",
          *(f"{r['area_protocol'][k]:.4f}"
            for k in ('tpr', 'tnr', 'mean_tpr_tnr', 'image_f1', 'pixel_f1')))
         for r in with_protocol], right_from=1)
  if figures:
    lines += ['', '## Figures']
    for name, path in figures.items():
      lines += ['', f'### {name}', '', f'![{name}]({path})']
  return '\n'.join(lines) + '\n'


def _checked_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], what: str,
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The curves as float arrays, after checking there are some and x fits y."""
  if not curves:
    raise ValueError(f'no {what} curves to plot')
  checked = {}
  for name, (x, y) in curves.items():
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 1 or x.shape != y.shape:
      raise ValueError(f'{what} curve {name!r}: x of shape {x.shape} but y of '
                       f'shape {y.shape}; both must be the same 1-D shape')
    checked[name] = x, y
  return checked


def _save(figure: Figure, path: str) -> None:
  """Writes the figure as PNG at a fixed dpi so pixel sizes follow figsize."""
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  figure.savefig(path, dpi=_DPI)


def plot_roc(path: str, pixel_curves: dict[str, tuple[np.ndarray, np.ndarray]],
             image_curves: dict[str, tuple[np.ndarray, np.ndarray]],
             title: str) -> None:
  """Writes a PNG with pixel- and image-level ROC curves side by side.

  Args:
    path: output PNG path; missing folders are created.
    pixel_curves: row name -> (fpr, tpr) over all test pixels.
    image_curves: row name -> (fpr, tpr) over the image scores.
    title: figure title.

  Raises:
    ValueError: if either dict is empty or a curve's arrays differ in shape.
  """
  panels = (('pixel-level ROC', _checked_curves(pixel_curves, 'pixel ROC')),
            ('image-level ROC', _checked_curves(image_curves, 'image ROC')))
  figure = Figure(figsize=(10, 4.8), layout='constrained')
  figure.suptitle(title)
  for axes, (panel_title, curves) in zip(figure.subplots(1, 2), panels, strict=True):
    axes.plot([0, 1], [0, 1], color='0.6', linestyle='--', linewidth=1,
              label='chance (0.5)')
    for name, (fpr, tpr) in curves.items():
      axes.plot(fpr, tpr, label=f'{name} (AUROC {np.trapezoid(tpr, fpr):.4f})')
    axes.set(title=panel_title, xlabel='false positive rate',
             ylabel='true positive rate', xlim=(0, 1), ylim=(0, 1.02),
             aspect='equal')
    axes.legend(loc='lower right', fontsize=8)
  _save(figure, path)


def plot_pro(path: str, curves: dict[str, tuple[np.ndarray, np.ndarray]],
             max_fpr: float, title: str) -> None:
  """Writes a PNG of PRO against FPR on [0, max_fpr], AUPRO in the legend.

  Args:
    path: output PNG path; missing folders are created.
    curves: row name -> (fpr, pro) as from `metrics.pro_curve(..., max_fpr)`.
    max_fpr: upper end of the FPR axis and the AUPRO normaliser.
    title: figure title.

  Raises:
    ValueError: if `curves` is empty, a curve's arrays differ in shape, or a
      curve goes beyond max_fpr (its area would not be the AUPRO).
  """
  curves = _checked_curves(curves, 'PRO')
  figure = Figure(figsize=(6, 4.8), layout='constrained')
  axes = figure.subplots()
  for name, (fpr, pro) in curves.items():
    if fpr.size and fpr.max() > max_fpr * (1 + 1e-9):
      raise ValueError(f'PRO curve {name!r} reaches FPR {fpr.max():.4g} beyond '
                       f'max_fpr {max_fpr}; cut it with metrics.pro_curve')
    aupro = np.trapezoid(pro, fpr) / max_fpr
    axes.plot(fpr, pro, label=f'{name} (AUPRO@{max_fpr:g} {aupro:.4f})')
  axes.set(title=title, xlabel='false positive rate (normal pixels)',
           ylabel='per-region overlap', xlim=(0, max_fpr), ylim=(0, 1.02))
  axes.legend(loc='lower right', fontsize=8)
  _save(figure, path)


def select_examples(scores: np.ndarray, labels: np.ndarray, num: int,
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the `num` worst and `num` best scored test images.

  The image scores are min-max normalised over the test set to s in [0, 1]
  (s = 0.5 for all when the scores are constant) and the error of an image is
  |label - s|: the worst are normal images scored high and defects scored
  low, the best the images whose score sits firmly on the right side. Equal
  errors keep index order (stable sort). With fewer than 2 * num images the
  two sets split what exists without overlapping, the worst getting the odd
  one.

  Args:
    scores: (N,) image scores; higher means more anomalous.
    labels: (N,) truthy for defective images.
    num: how many of each to pick, at least 0.

  Returns:
    (worst, best): index arrays, each ordered from the most extreme on.

  Raises:
    ValueError: on non-1-D or mismatched shapes, or a negative num.
  """
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  if scores.ndim != 1 or scores.shape != labels.shape:
    raise ValueError(f'scores of shape {scores.shape} but labels of shape '
                     f'{labels.shape}; both must be (N,)')
  if num < 0:
    raise ValueError(f'num must be at least 0, got {num}')
  count = scores.size
  if count == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  low, high = scores.min(), scores.max()
  normalised = ((scores - low) / (high - low) if high > low
                else np.full(count, 0.5))
  error = np.abs(labels - normalised)
  num_worst = min(num, (count + 1) // 2)
  num_best = min(num, count - num_worst)
  worst = np.argsort(-error, kind='stable')[:num_worst]
  ascending = np.argsort(error, kind='stable')
  best = ascending[~np.isin(ascending, worst)][:num_best]
  return worst, best


def _check_examples(images: np.ndarray, masks: np.ndarray, maps: np.ndarray,
                    scores: np.ndarray, labels: np.ndarray, names: Sequence[str],
                    indices: np.ndarray) -> None:
  """Raises ValueError unless the example arrays agree in N, H and W."""
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'images must be (N, H, W, 3), got shape {images.shape}')
  for what, array in (('masks', masks), ('maps', maps)):
    if array.shape != images.shape[:3]:
      raise ValueError(f'images of shape {images.shape} but {what} of shape '
                       f'{array.shape}; expected {images.shape[:3]}')
  for what, array in (('scores', scores), ('labels', labels)):
    if array.shape != images.shape[:1]:
      raise ValueError(f'images of shape {images.shape} but {what} of shape '
                       f'{array.shape}; expected {images.shape[:1]}')
  if len(names) != len(images):
    raise ValueError(f'images of shape {images.shape} but {len(names)} names')
  if indices.ndim != 1 or indices.size == 0:
    raise ValueError(f'indices must be a non-empty 1-D array, got shape '
                     f'{indices.shape}')
  if indices.min() < 0 or indices.max() >= len(images):
    raise ValueError(f'indices must lie in [0, {len(images)}), got '
                     f'{indices.min()}..{indices.max()}')


def plot_examples(path: str, images: np.ndarray, masks: np.ndarray,
                  maps: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                  names: Sequence[str], indices: np.ndarray,
                  pixel_threshold: float, title: str) -> None:
  """Writes a PNG grid: per selected image, the image, mask, map and decision.

  The overlay shows clip(map / (2 * pixel_threshold), 0, 1) so that the
  threshold sits mid-colormap and maps are comparable across rows; with a
  non-positive threshold it falls back to the range of the selected maps.

  Args:
    path: output PNG path; missing folders are created.
    images: (N, H, W, 3) uint8 test images.
    masks: (N, H, W) ground-truth masks, truthy on defects.
    maps: (N, H, W) anomaly maps.
    scores: (N,) image scores.
    labels: (N,) truthy for defective images.
    names: N image names shown in the row titles.
    indices: which images to show, one grid row each, in this order.
    pixel_threshold: map >= this is a defect pixel (fourth column).
    title: figure title.

  Raises:
    ValueError: on shapes that disagree, or empty or out-of-range indices.
  """
  images, masks, maps = np.asarray(images), np.asarray(masks), np.asarray(maps)
  scores, labels = np.asarray(scores), np.asarray(labels)
  indices = np.asarray(indices, np.int64)
  _check_examples(images, masks, maps, scores, labels, names, indices)
  shown = maps[indices].astype(np.float64)
  if pixel_threshold > 0:
    scaled = np.clip(shown / (2 * pixel_threshold), 0, 1)
    scaling = f'map / (2 x threshold {pixel_threshold:.4g}), clipped to [0, 1]'
  else:
    low, high = shown.min(), shown.max()
    scaled = (shown - low) / (high - low) if high > low else np.zeros_like(shown)
    scaling = f'map range [{low:.4g}, {high:.4g}] of the shown images'
  columns = len(_EXAMPLE_COLUMNS)
  figure = Figure(figsize=(columns * _CELL_INCHES, len(indices) * _CELL_INCHES + 0.6),
                  layout='constrained')
  figure.suptitle(f'{title}\noverlay: {scaling}; threshold {pixel_threshold:.4g}',
                  fontsize=10)
  grid = figure.subplots(len(indices), columns, squeeze=False)
  for row, (axes, index) in enumerate(zip(grid, indices, strict=True)):
    label = 'defect' if labels[index] else 'good'
    axes[0].imshow(images[index])
    axes[1].imshow(masks[index].astype(bool), cmap='gray', vmin=0, vmax=1)
    axes[2].imshow(images[index])
    axes[2].imshow(scaled[row], cmap='jet', vmin=0, vmax=1, alpha=0.5)
    axes[3].imshow(maps[index] >= pixel_threshold, cmap='gray', vmin=0, vmax=1)
    axes[0].set_ylabel(f'{names[index]}\n{label}, score {float(scores[index]):.4g}',
                       fontsize=8)
    for column, cell in enumerate(axes):
      cell.set_xticks([])
      cell.set_yticks([])
      if row == 0:
        cell.set_title(_EXAMPLE_COLUMNS[column], fontsize=9)
  _save(figure, path)
