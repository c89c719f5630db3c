"""Stage 2, the three-row evaluation, thresholds and prediction on the shared tiny run."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from twostage_jax import cli
from twostage_jax import data
from twostage_jax import methods
from twostage_jax import synthesis
from twostage_jax.evaluation import evaluate
from twostage_jax.inference import calibration
from twostage_jax.inference import engine
from twostage_jax.inference import predict
from twostage_jax.synthesis import superpixel
from twostage_jax.training import train
from twostage_jax.training import train_state
from twostage_jax.workdir import paths

from tiny_runs import two_stage_config  # tests/tiny_runs.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = ['stage 1', 'stage 2', 'combined']


def test_both_stages_train_on_l2_plus_ssim_with_their_own_checkpoints(two_stage_run):
  _, workdir, _ = two_stage_run
  assert sorted(os.listdir(paths.stage_checkpoints(workdir, 1))) == ['2', '4']
  assert sorted(os.listdir(paths.stage_checkpoints(workdir, 2))) == ['2', '4']
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['stage'] for r in records] == [1] * 4 + [2] * 4
  # Paper 001: L2 + SSIM trains both networks. The step adds the float32 terms, so
  # the logged loss is their sum to a few roundings of 2^-24 (6e-8) of the terms,
  # which are at most the loss: 1e-5 leaves a factor of 100.
  for record in records:
    assert record['loss'] == pytest.approx(record['l2'] + 1 - record['ssim'], rel=1e-5)


def test_stage2_alone_needs_stage1_and_names_the_workdir(two_stage_run, tmp_path):
  config = two_stage_run[0].copy_and_resolve_references()
  config.stage = '2'
  assert train.stages_to_train(methods.get(config.method), config) == (2,)
  with pytest.raises(FileNotFoundError, match=f'no stage-1 checkpoint .*workdir {tmp_path}'):
    train.train(methods.get(config.method), config, str(tmp_path), 2)


def test_evaluation_reports_three_rows_and_writes_the_report(two_stage_run):
  _, workdir, results = two_stage_run
  assert list(results['rows']) == ROWS
  assert results['stage1_step'] == results['stage2_step'] == 4
  assert results['num_images'] == 4 + 3 * 2
  for row in results['rows'].values():
    assert set(row) == {'pixel_auroc', 'image_auroc', 'pixel_aupro', 'pixel_ap',
                        'pixel_f1_max', 'image_f1_max', 'pixel_iou_max'}
    assert all(0 <= v <= 1 for v in row.values())
  # The reference rows: a constant map reads 0.5; the mean held-out map is there.
  references = results['references']
  assert list(references) == ['baseline', 'position only']
  assert references['baseline']['pixel_auroc'] == references['baseline']['image_auroc'] == 0.5
  assert references['position only']['image_auroc'] == 0.5  # one map for all images
  assert set(results['flagged']) <= set(ROWS)
  out = os.path.join(workdir, 'eval')
  assert json.load(open(os.path.join(out, 'metrics.json'))) == results
  report_md = open(os.path.join(out, 'report.md')).read()
  table = report_md.split('## Metrics')[1].split('\n## ')[0].splitlines()
  names = [line.split(' | ')[1].removesuffix(' (flagged)') for line in table
           if line.startswith('| weave |')]
  assert names == ROWS + ['baseline', 'position only']
  for name in ('roc.png', 'pro.png', 'examples.png'):
    assert f']({name})' in report_md
    with Image.open(os.path.join(out, name)) as image:
      assert image.size[0] > 200 and image.size[1] > 200


def test_combined_map_is_the_sum_of_the_stage_maps(two_stage_run):
  config, workdir, _ = two_stage_run
  model = engine.load_model(config, workdir)
  test = data.load_test_set(data.resolve_data_dir(config), config.category, config.image_size)
  maps = engine.anomaly_maps(config, model, test.images)
  assert list(maps) == ROWS
  # One float32 addition in the program: within 2^-24 (6e-8) of the sum, at most 2 here.
  np.testing.assert_allclose(maps['combined'], maps['stage 1'] + maps['stage 2'], atol=1e-6)
  scores = engine.image_scores(config, maps)
  assert set(scores) == set(ROWS) and all(s.shape == (len(test.images),) for s in scores.values())


def test_metrics_are_those_of_the_maps(two_stage_run):
  config, workdir, results = two_stage_run
  model = engine.load_model(config, workdir)
  test = data.load_test_set(data.resolve_data_dir(config), config.category, config.image_size)
  maps = engine.anomaly_maps(config, model, test.images)
  scores = engine.image_scores(config, maps)
  for row in ROWS:
    expected = evaluate.row_metrics(maps[row], scores[row], test)
    assert results['rows'][row] == pytest.approx(expected)


def test_thresholds_are_quantiles_of_the_held_out_normal_images(two_stage_run):
  config, workdir, results = two_stage_run
  stored = json.load(open(paths.thresholds_file(workdir)))
  assert stored == results['thresholds']
  assert stored['num_holdout_images'] == 4  # 20% of 20 training images
  _, held_out = data.training_images(config)
  model = engine.load_model(config, workdir)
  maps = engine.anomaly_maps(config, model, held_out)
  scores = engine.image_scores(config, maps)
  assert stored['image'] == pytest.approx(np.quantile(scores['combined'], 0.99), rel=1e-6)
  assert stored['pixel'] == pytest.approx(np.quantile(maps['combined'], 0.999), rel=1e-6)

  changed = config.copy_and_resolve_references()
  changed.calibration.pixel_quantile = 0.5
  again = calibration.ensure_thresholds(changed, workdir, model)
  assert again['pixel'] == pytest.approx(np.quantile(maps['combined'], 0.5), rel=1e-6)

  # Smoothing changes the maps, so thresholds stored for unsmoothed maps are stale.
  smoothed = config.copy_and_resolve_references()
  smoothed.eval.map_sigma = 2.0
  again = calibration.ensure_thresholds(smoothed, workdir, model)
  smoothed_maps = engine.anomaly_maps(smoothed, model, held_out)
  assert again['pixel'] == pytest.approx(np.quantile(smoothed_maps['combined'], 0.999), rel=1e-6)
  assert json.load(open(paths.thresholds_file(workdir)))['map_sigma'] == 2.0

  # So does a refinement setting: the combined map is another one.
  refined = config.copy_and_resolve_references()
  refined.refine.combine = 'max'
  again = calibration.ensure_thresholds(refined, workdir, model)
  refined_maps = engine.anomaly_maps(refined, model, held_out)
  assert again['pixel'] == pytest.approx(np.quantile(refined_maps['combined'], 0.999), rel=1e-6)
  assert json.load(open(paths.thresholds_file(workdir)))['refine']['combine'] == 'max'
  calibration.ensure_thresholds(config, workdir, model)  # restores the stored ones

  # Thresholds stored by code that computed other maps are not taken as current.
  older = {**json.load(open(paths.thresholds_file(workdir))),
           'maps_revision': calibration.MAPS_REVISION - 1, 'pixel': -1.0}
  with open(paths.thresholds_file(workdir), 'w') as f:
    json.dump(older, f)
  again = calibration.ensure_thresholds(config, workdir, model)
  assert again['pixel'] == pytest.approx(np.quantile(maps['combined'], 0.999), rel=1e-6)


def test_evaluation_pairs_stage2_with_the_stage1_checkpoint_it_was_trained_on(
    two_stage_run, tmp_path, caplog):
  config, workdir, _ = two_stage_run
  assert train_state.provenance(config, workdir, 2, 4) == {'stage1_step': 4}
  run = str(tmp_path / 'run')
  shutil.copytree(os.path.join(workdir, 'checkpoints'), os.path.join(run, 'checkpoints'))
  # A newer stage-1 checkpoint, as after training stage 1 further: stage 2 still pairs with 4.
  shutil.copytree(os.path.join(run, 'checkpoints', 'stage1', '4'),
                  os.path.join(run, 'checkpoints', 'stage1', '6'))
  assert engine.load_model(config, run).stage_steps == (4, 4)

  explicit = config.copy_and_resolve_references()
  explicit.eval.stage1_step = 2
  with caplog.at_level('WARNING'):
    assert engine.load_model(explicit, run).stage_steps == (2, 4)
  assert 'not trained together' in caplog.text

  shutil.rmtree(os.path.join(run, 'checkpoints', 'stage1', '4'))
  with pytest.raises(FileNotFoundError, match='trained on the stage-1 checkpoint of step 4, '
                                              'which is gone'):
    engine.load_model(config, run)


def test_holdout_split_is_fixed_disjoint_and_checked():
  kept, held = data.split_holdout(20, 0.1, seed=3)
  assert len(held) == 2 and len(kept) == 18
  assert sorted(np.concatenate([kept, held]).tolist()) == list(range(20))
  np.testing.assert_array_equal(data.split_holdout(20, 0.1, seed=3)[1], held)
  assert len(data.split_holdout(5, 0.01, seed=0)[1]) == 1  # at least one
  assert len(data.split_holdout(5, 0.0, seed=0)[1]) == 0
  with pytest.raises(ValueError, match='leaves none to train on'):
    data.split_holdout(1, 0.5, seed=0)
  with pytest.raises(ValueError, match=r'must lie in \[0, 1\)'):
    data.split_holdout(10, 1.0, seed=0)


def test_training_never_sees_the_held_out_images(two_stage_run):
  config, _, _ = two_stage_run
  kept, held_out = data.training_images(config)
  everything = data.load_train_images(data.resolve_data_dir(config), config.category,
                                      config.image_size)
  assert len(kept) + len(held_out) == len(everything)
  kept_bytes = {image.tobytes() for image in kept}
  assert not any(image.tobytes() in kept_bytes for image in held_out)


def test_self_sources_are_the_training_images_without_the_held_out_ones(two_stage_run):
  config, _, _ = two_stage_run
  kept, held_out = data.training_images(config)
  stores = os.path.join(data.default_cache_dir(config.cache_dir), 'sources')
  [name] = [n for n in os.listdir(stores) if n.startswith(f'{config.category}-train-')]
  store = synthesis.SourceStore.open(os.path.join(stores, name))
  np.testing.assert_array_equal(store.images, kept)
  assert store.n_segments == tuple(sorted(config.synthesis.saim_n_segments))
  assert len(held_out) > 0


def test_a_stage1_only_run_reports_one_row(two_stage_run, tmp_path):
  config, workdir, _ = two_stage_run
  shutil.copytree(paths.stage_checkpoints(workdir, 1),
                  paths.stage_checkpoints(str(tmp_path), 1))
  results = evaluate.evaluate(config, str(tmp_path))
  assert list(results['rows']) == ['stage 1']
  assert results['stage2_step'] is None and results['thresholds']['map'] == 'stage 1'


def write_mixed_folder(folder):
  rng = np.random.default_rng(0)
  os.makedirs(folder)
  Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(f'{folder}/rgb.png')
  Image.fromarray(rng.integers(0, 256, (50, 70), np.uint8), 'L').save(f'{folder}/gray.png')
  Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(f'{folder}/photo.jpg')
  with open(f'{folder}/notes.txt', 'w') as f:
    f.write('not an image')


def test_predict_writes_heatmaps_masks_and_scores(two_stage_run, tmp_path, caplog):
  config, workdir, _ = two_stage_run
  config = config.copy_and_resolve_references()
  config.predict_dir = str(tmp_path / 'new')
  config.predict_output_dir = str(tmp_path / 'out')
  write_mixed_folder(config.predict_dir)
  out = predict.predict(config, workdir)
  assert out == config.predict_output_dir
  assert 'notes.txt' in caplog.text
  names = sorted(os.listdir(out))
  assert names == sorted(['scores.csv'] + [f'{stem}_{kind}.png' for stem in
                                          ('gray', 'photo', 'rgb') for kind in ('heatmap', 'mask')])
  with Image.open(os.path.join(out, 'gray_mask.png')) as mask:
    assert mask.size == (70, 50)  # the original size, not the model's
  with Image.open(os.path.join(out, 'gray_heatmap.png')) as heatmap:
    assert heatmap.mode == 'RGB' and heatmap.size == (70, 50)
  thresholds = json.load(open(paths.thresholds_file(workdir)))
  rows = list(csv.DictReader(open(os.path.join(out, 'scores.csv'))))
  assert [r['file'] for r in rows] == ['gray.png', 'photo.jpg', 'rgb.png']
  for row in rows:
    expected = 'anomalous' if float(row['image_score']) >= thresholds['image'] else 'normal'
    assert row['decision'] == expected


def test_predict_errors_name_the_problem(two_stage_run, tmp_path):
  config, workdir, _ = two_stage_run
  config = config.copy_and_resolve_references()
  with pytest.raises(ValueError, match='needs --config.predict_dir'):
    predict.predict(config, workdir)
  config.predict_dir = str(tmp_path / 'empty')
  os.makedirs(config.predict_dir)
  with pytest.raises(data.DatasetError, match=f'no images .* in {tmp_path / "empty"}'):
    predict.predict(config, workdir)
  config.predict_dir = str(tmp_path / 'new')
  write_mixed_folder(config.predict_dir)
  with pytest.raises(FileNotFoundError, match=f'workdir {tmp_path / "untrained"}'):
    predict.predict(config, str(tmp_path / 'untrained'))


@pytest.mark.slow
def test_all_categories_trains_one_model_each_and_summarises(tmp_path, capsys):
  # The shared run's programs, compiled once; no figures beyond the report's
  # curves, no held-out maps in TensorBoard.
  config = two_stage_config(category='all', **{'eval.num_examples': 0,
                                                'train.tensorboard_images': 0})
  cli.run_all_categories(config, str(tmp_path / 'runs'), 'train')
  summary = json.load(open(tmp_path / 'runs' / 'eval' / 'summary.json'))
  assert [r['category'] for r in summary] == list(data.DEMO_CATEGORIES)
  for category in data.DEMO_CATEGORIES:
    assert os.path.isdir(paths.stage_checkpoints(str(tmp_path / 'runs' / category), 2))
  report_md = (tmp_path / 'runs' / 'eval' / 'report.md').read_text()
  mean_line = next(line for line in report_md.splitlines() if '| **mean** | combined |' in line)
  expected = np.mean([r['rows']['combined']['pixel_auroc'] for r in summary])
  assert f'{expected:.4f}' in mean_line
  assert 'mean' in capsys.readouterr().out
  # eval.num_examples 0: no example figure, and the report links none.
  assert not (tmp_path / 'runs' / data.DEMO_CATEGORIES[0] / 'eval' / 'examples.png').exists()
  assert 'examples.png' not in report_md
  assert (tmp_path / 'runs' / data.DEMO_CATEGORIES[0] / 'eval' / 'roc.png').exists()


def test_main_reports_file_problems_without_a_traceback(tmp_path):
  os.makedirs(tmp_path / 'empty')
  command = [sys.executable, os.path.join(ROOT, 'main.py'),
             f'--config={os.path.join(ROOT, "configs", "demo.py")}',
             f'--workdir={tmp_path / "run"}', '--mode=predict',
             f'--config.predict_dir={tmp_path / "empty"}']
  result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 1
  assert 'error: no images (.png' in result.stderr and str(tmp_path / 'empty') in result.stderr
  assert 'Traceback' not in result.stderr


def test_host_superpixels_are_each_images_slic_labels_and_exports_use_the_device_ones():
  """refine.superpixels='host' (the demo's): stage 2's labels come from the host
  SLIC, image by image in batch order; an export swaps in the device SLIC."""
  host = two_stage_config(**{'refine.superpixels': 'host'})
  method = methods.get('two_stage')
  images = (np.random.default_rng(0).random((5, 32, 32, 3)) * 255).astype(np.uint8)
  batches = [b['labels'] for b in method.host_inputs(host, (1, 2), images, 2, 0)]
  assert [len(b) for b in batches] == [2, 2, 1]
  settings = {key: host.refine[key] for key in ('n_segments', 'compactness', 'sigma')}
  np.testing.assert_array_equal(np.concatenate(batches),
                                [superpixel.slic_labels(image, **settings) for image in images])
  assert method.pure_config(host).refine.superpixels == 'device'
  assert host.refine.superpixels == 'host'  # the run's own config is left as it is
  device = two_stage_config()
  assert method.pure_config(device) is device
