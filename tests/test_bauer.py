"""Bauer's method through the shared train, evaluate and predict paths."""

import csv
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from PIL import Image

from configs import bauer
from configs import mvtec
from twostage_jax import config_validation
from twostage_jax import methods
from twostage_jax import synthesis
from twostage_jax.evaluation import evaluate
from twostage_jax.inference import engine
from twostage_jax.inference import predict
from twostage_jax.training import train
import float32_tolerance  # tests/float32_tolerance.py
import tiny_runs  # tests/tiny_runs.py


def tiny_config(**extra):
  config = bauer.get_config()
  config.update_from_flattened_dict({
      **tiny_runs.TINY_DEMO,
      'category': 'weave',
      'model.encoder_widths': (4, 8),
      'model.sdc_blocks': 1,
      'model.sdc_filters': 4,
      'model.sdc_dilations': (1, 2),
      'model.sdc_kernel': 3,
      'train.num_steps': 3,
      'train.log_every': 1,
      'train.learning_rate': 1e-3,
      'eval.num_examples': 2,
      'eval.map_sigma': 1.0,
      'eval.min_defect_fraction': 0.01,
      **extra,
  })
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir, results) of a tiny run with objective 1."""
  workdir = str(tmp_path_factory.mktemp('bauer'))
  config = tiny_config(**{'loss.objective': 1})
  config_validation.validate(config)
  assert train.stages_to_train(methods.get(config.method), config) == (1,)
  train.train(methods.get(config.method), config, workdir, 1)
  return config, workdir, evaluate.evaluate(config, workdir)


def test_training_logs_the_objective_terms(trained):
  config, workdir, _ = trained
  records = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in records] == [1, 2, 3]
  for r in records:  # float32 sums of two terms: see the next test
    assert r['loss'] == pytest.approx(r['normal_term'] + r['modified_term'], rel=1e-5)
    assert r['modified_term'] > 0  # every sample was distorted


@pytest.mark.parametrize('objective, sign', [(1, 1), (3, -1)])
def test_the_objective_adds_or_subtracts_the_modified_term(objective, sign):
  """What the step logs: loss = normal_term + modified_term (1) or - modified_term (3).

  The loss is a float32 sum of the two weighted terms: a few roundings of
  2^-24 (6e-8) of the larger term off their exact sum. Objective 3's
  difference can cancel, so the tolerance is relative to the terms, not to
  the loss: 1e-5 of them leaves a factor of 100.
  """
  config = tiny_config(**{'loss.objective': objective})
  rng = np.random.default_rng(objective)
  target = rng.random((4, 32, 32, 3), np.float32)
  mask = (rng.random((4, 32, 32)) < 0.3).astype(np.float32)
  batch = {'target': target, 'mask': mask,
           'image': np.where(mask[..., None] > 0, rng.random(target.shape, np.float32), target)}
  loss, terms = methods.get('bauer').objective(config, 1)(
      jnp.asarray(rng.random(target.shape, np.float32)), batch)
  assert float(terms['loss']) == float(loss)
  assert float(terms['modified_term']) > 0
  scale = float(terms['normal_term']) + float(terms['modified_term'])
  assert abs(float(loss) - (terms['normal_term'] + sign * terms['modified_term'])) <= 1e-5 * scale


def test_evaluation_reports_the_autoencoder_and_bauer_protocol(trained):
  config, workdir, results = trained
  assert list(results['rows']) == ['autoencoder']
  assert 'stage2_step' not in results and results['final_map'] == 'autoencoder'
  protocol = results['area_protocol']
  assert protocol['min_area'] == round(0.01 * 32 * 32)
  assert protocol['mean_tpr_tnr'] == pytest.approx((protocol['tpr'] + protocol['tnr']) / 2)
  report_md = open(os.path.join(workdir, 'eval', 'report.md')).read()
  assert "Bauer's minimum-area protocol" in report_md and '| autoencoder |' in report_md


def test_anomaly_map_is_the_smoothed_channel_mean_absolute_error(trained):
  config, workdir, _ = trained
  model = engine.load_model(config, workdir)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 32, 32, 3), np.uint8)
  maps = engine.anomaly_maps(config, model, images)['autoencoder']
  reconstructions = methods.get(config.method).create_model(config, 1).apply(
      model.variables[0], jnp.asarray(images, jnp.float32) / 255.0, train=False)
  error = np.mean(np.abs(np.asarray(reconstructions) - images / 255.0), axis=-1)
  expected = scipy.ndimage.gaussian_filter(error, (0, 1.0, 1.0), mode='reflect', truncate=3.0)
  # The reconstruction computed op by op here, in one program there.
  float32_tolerance.assert_same_function(maps, expected)
  scores = engine.image_scores(config, {'autoencoder': maps})['autoencoder']
  np.testing.assert_allclose(scores, maps.max(axis=(1, 2)))  # eval.score_rule = 'max'


def test_predict_uses_the_autoencoder_map(trained, tmp_path):
  config, workdir, _ = trained
  config = config.copy_and_resolve_references()
  config.predict_dir = str(tmp_path / 'in')
  os.makedirs(config.predict_dir)
  Image.fromarray(np.full((40, 30), 128, np.uint8), 'L').save(f'{config.predict_dir}/gray.png')
  out = predict.predict(config, workdir)
  rows = list(csv.DictReader(open(os.path.join(out, 'scores.csv'))))
  assert [r['file'] for r in rows] == ['gray.png']
  with Image.open(os.path.join(out, 'gray_mask.png')) as mask:
    assert mask.size == (30, 40)


def test_bauer_sampler_returns_distortion_target_and_exact_mask():
  config = bauer.get_config()
  config.category = 'grid'  # all rotations and flips
  sampler = synthesis.DistortionSampler(config)
  image = np.random.default_rng(1).random((32, 32, 3)).astype(np.float32)
  seen = set()
  for seed in range(12):
    sample = sampler(image, np.random.default_rng(seed))
    assert set(sample) == {'image', 'target', 'mask'}
    target = sample['target']
    assert any(np.array_equal(target, np.rot90(flipped, k))
               for flipped in (image, image[:, ::-1], image[::-1], image[::-1, ::-1])
               for k in range(4))
    changed = np.any(sample['image'] != target, axis=-1)
    np.testing.assert_array_equal(sample['mask'], changed.astype(np.float32))
    assert changed.any()  # p_distort = 1
    seen.add(target.tobytes())
  assert len(seen) > 1  # the augmentation varies


def test_augmentation_is_chosen_per_category():
  config = bauer.get_config()
  config.category = 'grid'
  assert tuple(synthesis.augment_settings(config).rotations) == (0, 90, 180, 270)
  config.category = 'cable'  # not listed: the default, no augmentation
  settings = synthesis.augment_settings(config)
  assert tuple(settings.rotations) == (0,) and not settings.hflip and not settings.vflip


def test_patch_distortion_as_a_third_generator_for_the_two_stage_model():
  config = mvtec.get_config()
  config.synthesis.p_anomaly = 1.0
  config.synthesis.p_distortion = 1.0
  sources = synthesis.SourceStore.from_images(
      synthesis.load_anomaly_sources('', 32)[:2], config.synthesis.saim_n_segments,
      config.synthesis.saim_compactness, config.synthesis.saim_sigma)
  distorter = synthesis.PatchDistorter(config.distortion)
  synth = synthesis.PseudoAnomalySynthesizer(sources, config.synthesis, distorter)
  image = np.random.default_rng(2).random((32, 32, 3)).astype(np.float32)
  out, mask = synth(image, np.random.default_rng(5))
  reference = np.random.default_rng(5)
  reference.random(), reference.random()  # the anomaly and generator draws
  expected, expected_mask = distorter(image, reference)
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(mask, expected_mask)
  with pytest.raises(ValueError, match='p_distortion > 0 needs a distorter'):
    synthesis.PseudoAnomalySynthesizer(sources, config.synthesis)


@pytest.mark.parametrize('key, value, message', [
    ('loss.objective', 2, 'config.loss.objective = 2 must be 1 or 3'),
    ('loss.lam', 1.5, 'config.loss.lam = 1.5 must be in'),
    ('stage', '2', "config.stage = '2' must be 'both' or '1' for method 'bauer'"),
    ('method', 'draem',
     "unknown method 'draem'; known methods: 'anoseg', 'bauer', 'two_stage', 'utad'"),
    ('image_size', 36, 'config.image_size = 36 must be a multiple of 8'),
])
def test_bad_bauer_values_are_named(key, value, message):
  config = bauer.get_config()
  config.update_from_flattened_dict({key: value})
  with pytest.raises(ValueError, match=message):
    config_validation.validate(config)
