"""Report tables, example selection and plots against hand-built cases."""

import numpy as np
import pytest
from PIL import Image

from twostage_jax.evaluation import metrics
from twostage_jax.evaluation import report

KEYS = [key for key, _ in report.METRIC_COLUMNS]


def metric_row(*values):
  return dict(zip(KEYS, values, strict=True))


def two_categories(thresholds=None):
  """bottle has all three rows, grid only the two stages, so means cover those."""
  bottle = {
      'category': 'bottle', 'stage1_step': 2000, 'stage2_step': 1500,
      'num_images': 83, 'num_anomalous': 63, 'thresholds': thresholds,
      'rows': {
          'stage 1': metric_row(0.90, 0.80, 0.70, 0.60, 0.50, 0.40, 0.30),
          'stage 2': metric_row(0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35),
          'combined': metric_row(0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93),
      },
  }
  grid = {
      'category': 'grid', 'stage1_step': 3000, 'stage2_step': 2500,
      'num_images': 78, 'num_anomalous': 57, 'thresholds': None,
      'rows': {
          'stage 1': metric_row(0.70, 0.60, 0.50, 0.40, 0.30, 0.20, 0.10),
          'stage 2': metric_row(0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25),
      },
  }
  return [bottle, grid]


# Means of the two categories' rows, worked out by hand.
MEAN_STAGE_1 = [0.80, 0.70, 0.60, 0.50, 0.40, 0.30, 0.20]
MEAN_STAGE_2 = [0.90, 0.80, 0.70, 0.60, 0.50, 0.40, 0.30]


def console_values(line):
  """The metric cells of a console table line (its last columns)."""
  return [float(cell) for cell in line.split()[-len(KEYS):]]


def markdown_values(line):
  """The metric cells of a Markdown table line (after category and map)."""
  return [float(cell) for cell in line.strip('|').split('|')[2:]]


def test_format_table_has_a_line_per_row_and_hand_computed_means():
  lines = report.format_table(two_categories()).splitlines()
  assert lines[0].split()[:2] == ['category', 'map']
  assert 'AUPRO@0.3' in lines[0]
  body = [line for line in lines[1:] if not line.startswith('-')]
  assert [line.split()[0] for line in body] == ['bottle'] * 3 + ['grid'] * 2 + ['mean'] * 2
  assert console_values(body[2]) == [0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93]
  # 'combined' is not in every category, so it has no mean line.
  assert body[5].startswith('mean') and ' stage 1 ' in body[5]
  assert console_values(body[5]) == pytest.approx(MEAN_STAGE_1, abs=1e-12)
  assert ' stage 2 ' in body[6]
  assert console_values(body[6]) == pytest.approx(MEAN_STAGE_2, abs=1e-12)
  assert '0.8000' in body[5]  # 4 decimals


def test_format_table_of_one_category_has_no_mean_and_rejects_empty():
  lines = report.format_table(two_categories()[:1]).splitlines()
  assert len(lines) == 2 + 3
  assert not any(line.startswith('mean') for line in lines)
  with pytest.raises(ValueError, match='no results'):
    report.format_table([])


def test_markdown_report_tables_means_steps_and_figures():
  text = report.markdown_report(two_categories(), 'MVTec AD', {'ROC curves': 'roc.png'})
  lines = text.splitlines()
  assert lines[0] == '# MVTec AD'
  for category, name in [('bottle', 'stage 1'), ('bottle', 'stage 2'), ('bottle', 'combined'),
                         ('grid', 'stage 1'), ('grid', 'stage 2')]:
    assert sum(line.startswith(f'| {category} | {name} | ') for line in lines) == 1
  means = [line for line in lines if line.startswith('| **mean** |')]
  assert len(means) == 2
  assert markdown_values(means[0]) == pytest.approx(MEAN_STAGE_1, abs=1e-12)
  assert markdown_values(means[1]) == pytest.approx(MEAN_STAGE_2, abs=1e-12)
  assert '| bottle | 2000 | 1500 | 83 | 63 |' in lines
  assert '| grid | 3000 | 2500 | 78 | 57 |' in lines
  assert '![ROC curves](roc.png)' in lines
  assert 'SLIC superpixels' in text and '`refine.combine`' in text
  assert 'mean-filtered' in text
  assert 'Decision thresholds' not in text and 'held-out' not in text


def test_markdown_report_thresholds_only_where_present():
  thresholds = {'image': 0.41, 'pixel': 0.22, 'num_holdout_images': 21, 'map': 'combined',
                'image_quantile': 0.99, 'pixel_quantile': 0.999}
  text = report.markdown_report(two_categories(thresholds), 'run')
  assert '## Decision thresholds' in text
  assert 'held-out train/good images' in text and 'never' in text
  assert '| bottle | combined | 0.41 | 0.99 | 0.22 | 0.999 | 21 |' in text.splitlines()
  assert not any(line.startswith('| grid | 0.') for line in text.splitlines())
  assert '![' not in text


def test_markdown_report_of_stage_1_only_run():
  result = two_categories()[1]
  result['rows'] = {'stage 1': result['rows']['stage 1']}
  result['stage2_step'] = None
  text = report.markdown_report([result], 'stage 1 only')
  assert '| grid | 3000 | - | 78 | 57 |' in text.splitlines()
  assert '**stage 1**' in text and '**stage 2**' not in text
  assert '**mean**' not in text


def with_references():
  """Both categories with their baseline rows; bottle's stage 2 flagged."""
  results = two_categories()
  for result, position in zip(results, (0.92, 0.60)):
    result['references'] = {
        report.BASELINE: metric_row(0.5, 0.5, 0.1, 0.05, 0.1, 0.8, 0.05),
        report.POSITION_ONLY: metric_row(position, 0.5, 0.3, 0.1, 0.2, 0.8, 0.1)}
    result['flagged'] = report.flagged_rows(result['rows'], result['references'])
  return results


def test_reference_rows_follow_each_categorys_rows_and_flags_are_explained():
  results = with_references()
  assert results[0]['flagged'] == {
      'stage 1': 'pixel AUROC 0.9000 not above position only (0.9200)'}
  assert results[1]['flagged'] == {}
  lines = report.format_table(results).splitlines()
  body = [line for line in lines[2:] if not line.startswith(('-', '!'))]
  marked = [line.endswith('  !') for line in body]
  body = [line.removesuffix('  !') for line in body]
  assert [(line.split()[0], ' '.join(line.split()[1:-7])) for line in body] == [
      ('bottle', 'stage 1'), ('bottle', 'stage 2'), ('bottle', 'combined'),
      ('bottle', 'baseline'), ('bottle', 'position only'),
      ('grid', 'stage 1'), ('grid', 'stage 2'), ('grid', 'baseline'), ('grid', 'position only'),
      ('mean', 'stage 1'), ('mean', 'stage 2'), ('mean', 'baseline'), ('mean', 'position only')]
  assert marked == [True] + [False] * 12
  assert console_values(body[-1])[0] == pytest.approx((0.92 + 0.60) / 2)
  assert '! bottle, stage 1: pixel AUROC 0.9000 not above position only (0.9200)' in lines
  text = report.markdown_report(results, 'run')
  assert '| bottle | stage 1 (flagged) | 0.9000 |' in text
  assert '| grid | baseline | 0.5000 | 0.5000 |' in text
  assert '- bottle, stage 1: pixel AUROC 0.9000 not above position only (0.9200)' in text
  assert '**baseline**' in text and '**position only**' in text


def test_select_examples_picks_misjudged_and_clear_images():
  # Normalised over [0.05, 0.95], the errors |label - s| are
  # 0.056, 0.944, 0.5 for the normal images and 0, 1, 0.389 for the defects.
  scores = np.array([0.10, 0.90, 0.50, 0.95, 0.05, 0.60])
  labels = np.array([0, 0, 0, 1, 1, 1])
  worst, best = report.select_examples(scores, labels, 2)
  np.testing.assert_array_equal(worst, [4, 1])  # lowest defect, highest normal
  np.testing.assert_array_equal(best, [3, 0])
  worst, best = report.select_examples(scores, labels, 1)
  np.testing.assert_array_equal(worst, [4])
  np.testing.assert_array_equal(best, [3])


def test_select_examples_clips_num_without_overlap():
  scores, labels = np.array([0.2, 0.9, 0.4]), np.array([0, 1, 1])
  worst, best = report.select_examples(scores, labels, 10)
  # Errors 0, 0, 5/7: the odd image goes to the worst, ties in index order.
  np.testing.assert_array_equal(worst, [2, 0])
  np.testing.assert_array_equal(best, [1])
  assert [len(a) for a in report.select_examples(scores, labels, 0)] == [0, 0]


def test_select_examples_with_constant_scores_is_stable():
  worst, best = report.select_examples(np.full(5, 3.0), np.array([0, 1, 0, 1, 1]), 2)
  np.testing.assert_array_equal(worst, [0, 1])
  np.testing.assert_array_equal(best, [2, 3])
  worst, best = report.select_examples(np.full(4, 3.0), np.array([0, 1, 0, 1]), 5)
  np.testing.assert_array_equal(worst, [0, 1])
  np.testing.assert_array_equal(best, [2, 3])


def test_select_examples_rejects_bad_input():
  with pytest.raises(ValueError, match=r'scores of shape \(3,\) but labels of shape \(2,\)'):
    report.select_examples(np.zeros(3), np.zeros(2), 1)
  with pytest.raises(ValueError, match='num must be at least 0'):
    report.select_examples(np.zeros(3), np.zeros(3), -1)


def png_size(path):
  with Image.open(path) as image:
    assert image.format == 'PNG'
    image.load()
    return image.size


def separable_maps(num=6, size=16, seed=0):
  """Half normal images, half with a square defect the maps score higher."""
  rng = np.random.default_rng(seed)
  masks = np.zeros((num, size, size), bool)
  masks[num // 2:, 4:9, 5:11] = True
  maps = rng.random(masks.shape) * 0.4 + 0.5 * masks
  images = rng.integers(0, 256, (*masks.shape, 3), dtype=np.uint8)
  return images, masks, maps, maps.max(axis=(1, 2)), masks.any(axis=(1, 2))


def test_plot_roc_and_pro_write_pngs(tmp_path):
  _, masks, maps, scores, labels = separable_maps()
  roc_path = tmp_path / 'eval' / 'roc.png'
  report.plot_roc(str(roc_path),
                  {'stage 1': metrics.roc_curve(maps, masks),
                   'combined': metrics.roc_curve(2 * maps, masks)},
                  {'stage 1': metrics.roc_curve(scores, labels)}, 'bottle')
  width, height = png_size(roc_path)
  assert width > 1.5 * height  # two panels side by side
  pro_path = tmp_path / 'pro.png'
  report.plot_pro(str(pro_path), {'stage 1': metrics.pro_curve(maps, masks, 0.3)}, 0.3, 'bottle')
  width, height = png_size(pro_path)
  assert height < width < 1.5 * height


def test_plot_curves_reject_bad_input(tmp_path):
  path = str(tmp_path / 'bad.png')
  curve = (np.linspace(0, 1, 5), np.linspace(0, 1, 5))
  with pytest.raises(ValueError, match='no image ROC curves'):
    report.plot_roc(path, {'stage 1': curve}, {}, 't')
  with pytest.raises(ValueError, match='no PRO curves'):
    report.plot_pro(path, {}, 0.3, 't')
  with pytest.raises(ValueError, match=r"'stage 1': x of shape \(5,\) but y of shape \(4,\)"):
    report.plot_roc(path, {'stage 1': (curve[0], curve[1][:4])}, {'stage 1': curve}, 't')
  with pytest.raises(ValueError, match=r'beyond max_fpr 0\.3'):
    report.plot_pro(path, {'stage 1': curve}, 0.3, 't')
  assert not (tmp_path / 'bad.png').exists()


def test_plot_examples_grows_by_a_row_per_image(tmp_path):
  images, masks, maps, scores, labels = separable_maps()
  names = [f'{i:03d}.png' for i in range(len(images))]
  sizes = {}
  for rows in (2, 6):
    path = tmp_path / f'examples_{rows}.png'
    report.plot_examples(str(path), images, masks, maps, scores, labels, names,
                         np.arange(rows), 0.45, 'bottle')
    sizes[rows] = png_size(path)
  assert sizes[2][0] == sizes[6][0]
  assert sizes[6][1] > 2.5 * sizes[2][1]
  assert sizes[2][0] > sizes[2][1]  # 4 columns, 2 rows
  report.plot_examples(str(tmp_path / 'zero.png'), images, masks, maps, scores, labels,
                       names, np.array([5, 0]), 0.0, 'range-scaled')
  assert png_size(tmp_path / 'zero.png') == sizes[2]


def test_plot_examples_rejects_mismatched_input(tmp_path):
  images, masks, maps, scores, labels = separable_maps()
  names = [str(i) for i in range(len(images))]
  path = str(tmp_path / 'bad.png')
  args = {'images': images, 'masks': masks, 'maps': maps, 'scores': scores,
          'labels': labels, 'names': names, 'indices': np.arange(2),
          'pixel_threshold': 0.5, 'title': 't'}
  with pytest.raises(ValueError, match=r'images of shape \(6, 16, 16, 3\) but maps of shape '
                                       r'\(6, 8, 8\)'):
    report.plot_examples(path, **{**args, 'maps': maps[:, :8, :8]})
  with pytest.raises(ValueError, match=r'images of shape \(6, 16, 16, 3\) but labels of shape '
                                       r'\(5,\)'):
    report.plot_examples(path, **{**args, 'labels': labels[:5]})
  with pytest.raises(ValueError, match='but 5 names'):
    report.plot_examples(path, **{**args, 'names': names[:5]})
  with pytest.raises(ValueError, match=r'images must be \(N, H, W, 3\)'):
    report.plot_examples(path, **{**args, 'images': images[..., 0]})
  with pytest.raises(ValueError, match=r'indices must lie in \[0, 6\)'):
    report.plot_examples(path, **{**args, 'indices': np.array([0, 6])})
  with pytest.raises(ValueError, match='non-empty'):
    report.plot_examples(path, **{**args, 'indices': np.array([], int)})
  assert not (tmp_path / 'bad.png').exists()
