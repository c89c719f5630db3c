"""The trained detector as one pure function, its export, and the Python API.

`detector_fn` is `uint8 images [B, S, S, 3] -> (final maps [B, S, S], image
scores [B])`: preprocessing, the method's networks and device-side steps
(the two-stage refinement with SLIC on the device), smoothing and the image
score (the score rule, or the method's own), with the trained variables
inside. `export` writes it with `jax.export` (StableHLO, batch dimension symbolic) and a JSON of what a
caller needs; loading that needs JAX alone. `Detector` serves both a workdir
and an export to users' own code:

    from twostage_jax import Detector
    detector = Detector.load('runs/bottle')   # a workdir, or an export folder
    result = detector.predict(images)          # any sizes

`Detector.predict` reads a list or a 4-D array as a batch and a 3-D array
whose last axis is 1, 3 or 4 (or a 2-D one) as one image; values by dtype:
uint8 0..255, float in [0, 1], other integers 0..their dtype's largest.
Anything else is refused with a message naming it.
"""

import dataclasses
import functools
import importlib.metadata
import json
import os
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from twostage_jax import data
from twostage_jax import methods
from twostage_jax.inference import calibration
from twostage_jax.inference import engine
from twostage_jax.runtime import parallel
from twostage_jax.workdir import atomic_write
from twostage_jax.workdir import paths

EXPORT_FILE = 'detector.jax'
ONNX_FILE = 'detector.onnx'
ONNX_AFTER_HOST_FILE = 'detector_after_host.onnx'  # the second graph around a host step
INFO_FILE = 'detector.json'
_PROGRAM_FILES = {'stablehlo': EXPORT_FILE, 'onnx': ONNX_FILE}
_ALL_PROGRAM_FILES = (EXPORT_FILE, ONNX_FILE, ONNX_AFTER_HOST_FILE)
# Images per call: a fixed size, so the batch-polymorphic export compiles once.
_BATCH_SIZE_KEY = 'batch_size'
# What Detector reads from detector.json.
_INFO_KEYS = ('input_size', 'thresholds', _BATCH_SIZE_KEY)

DetectFn = Callable[[jax.Array], tuple[jax.Array, jax.Array]]


def _detector_of_variables(pure_config: ml_collections.ConfigDict, model: engine.TrainedModel
                           ) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
  """Pure `(variables, uint8 images) -> (final maps, image scores)` of `model`'s stages.

  `pure_config` is the run's config after `Method.pure_config`: everything the
  method computes on the host for evaluation (the two-stage model's SLIC
  labels) runs on the device here.
  """
  maps_and_scores = engine.maps_and_scores_fn(model.method, pure_config, model.trained)
  final = model.final_map

  def detect(variables: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    maps, scores = maps_and_scores(variables, {'image': images})
    return maps[final], scores[final]

  return detect


def detector_fn(config: ml_collections.ConfigDict, model: engine.TrainedModel) -> DetectFn:
  """The pure `uint8 images -> (final maps, image scores)` of a trained model.

  The trained variables are inside it, as constants, which is what an
  export holds.
  """
  pure_config = model.method.pure_config(config)
  return functools.partial(_detector_of_variables(pure_config, model), model.variables)


def _package_version() -> str:
  try:
    return importlib.metadata.version('twostage-jax')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown (not installed)'


def export(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes the workdir's detector to `<workdir>/export/`; returns that folder.

  By `export.format`: 'stablehlo' writes `detector.jax`, the serialized
  `jax.export.Exported` (lowered for `export.platforms`, any batch size);
  'onnx' writes `detector.onnx` (onnx_graph.py; input 'images', outputs
  'maps' and 'scores', any batch size, `detector.json`'s fields also in its
  metadata properties). Either comes with `detector.json`: format, input
  size, method, map name, thresholds and their quantiles, checkpoint steps
  and the package version. The thresholds are calibrated on the maps it
  computes, with the method's device-side steps (`Method.pure_config`).

  Raises:
    ImportError: naming the extra, if 'onnx' is asked for without it.
    onnx_graph.UnsupportedPrimitive: naming the operation, if the detector
      holds one the ONNX converter cannot express.
  """
  model = engine.load_model(config, workdir)
  config = model.method.pure_config(config)
  thresholds = calibration.ensure_thresholds(config, workdir, model)
  size = config.image_size
  detect = detector_fn(config, model)
  info = {
      'format': config.export.format,
      'input_size': size,
      'method': model.method.name,
      'map': model.final_map,
      'thresholds': {'image': thresholds['image'], 'pixel': thresholds['pixel'],
                     'image_quantile': config.calibration.image_quantile,
                     'pixel_quantile': config.calibration.pixel_quantile},
      'steps': model.steps,
      'score_rule': config.eval.score_rule,
      _BATCH_SIZE_KEY: config.eval.batch_size,
      'version': _package_version(),
  }
  if config.export.format == 'onnx':
    programs = onnx_programs(config, model, info)
  else:
    batch, = jax.export.symbolic_shape('batch')
    exported = jax.export.export(jax.jit(detect), platforms=tuple(config.export.platforms))(
        jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8))
    info['platforms'] = list(exported.platforms)
    programs = {EXPORT_FILE: bytes(exported.serialize())}
  folder = paths.export_dir(workdir)
  if jax.process_index() == 0:
    for name, program in programs.items():
      atomic_write.write_bytes(os.path.join(folder, name), program)
    atomic_write.write_json(os.path.join(folder, INFO_FILE), info)
    for other in set(_ALL_PROGRAM_FILES) - set(programs):  # an earlier export's
      if os.path.exists(os.path.join(folder, other)):
        os.remove(os.path.join(folder, other))
  return folder


def onnx_programs(config: ml_collections.ConfigDict, model: engine.TrainedModel,
                   info: dict[str, Any]) -> dict[str, bytes]:
  """The ONNX graphs of the detector by file name; adds the host step to `info`.

  One graph ('images' -> 'maps', 'scores') where the method's maps convert
  whole. A method with a host split (the two-stage model: its device SLIC
  does not convert) gives two: `detector.onnx` ('images' -> the first
  part's arrays) and `detector_after_host.onnx` ('images', those arrays
  and the host step's -> 'maps', 'scores'); `info['host_step']` names the
  method, its settings and the arrays in between.
  """
  converter = _onnx_graph()
  size, final, variables = config.image_size, model.final_map, model.variables
  images = converter.Input('images', (size, size, 3), np.uint8)
  split = model.method.host_split(config, model.trained)
  if split is None:
    graphs = {ONNX_FILE: converter.to_onnx(detector_fn(config, model), [images],
                                           ('maps', 'scores'))}
  else:
    first, second = engine.split_maps_and_scores_fns(model.method, config, model.trained,
                                                      split)
    shapes = jax.eval_shape(lambda x: first(variables, {'image': x}),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8))
    names = sorted(shapes)
    between = ([converter.Input(n, shapes[n].shape[1:], shapes[n].dtype) for n in names]
               + [converter.Input(n, tuple(shape), dtype)
                  for n, (shape, dtype) in sorted(split.host_outputs.items())])

    def after_host(image_batch, *arrays):
      batch = {'image': image_batch, **{i.name: a for i, a in zip(between, arrays)}}
      maps, scores = second(variables, batch)
      return maps[final], scores[final]

    graphs = {
        ONNX_FILE: converter.to_onnx(
            lambda x: tuple(first(variables, {'image': x})[n] for n in names), [images], names),
        ONNX_AFTER_HOST_FILE: converter.to_onnx(after_host, [images, *between],
                                                ('maps', 'scores')),
    }
    info['host_step'] = {'method': model.method.name, 'settings': split.settings,
                         'first_outputs': names, 'host_outputs': sorted(split.host_outputs)}
  for graph in graphs.values():
    for key, value in info.items():
      graph.metadata_props.add(key=key, value=json.dumps(value))
  return {name: graph.SerializeToString() for name, graph in graphs.items()}


def _onnx_graph() -> types.ModuleType:
  """The ONNX converter, whose onnx package is an optional extra."""
  try:
    from twostage_jax.inference import onnx_graph  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(f'the ONNX export needs the onnx extra: pip install \'.[onnx]\' '
                      f'({error})') from error
  return onnx_graph


def _onnx_call(folder: str, info: dict[str, Any]) -> DetectFn:
  """uint8 images -> (maps, scores) of an ONNX export, its host step run between its graphs."""
  first = _onnx_session(os.path.join(folder, ONNX_FILE))
  host = info.get('host_step')
  if host is None:
    return lambda images: tuple(first.run(['maps', 'scores'], {'images': images}))
  second = _onnx_session(os.path.join(folder, ONNX_AFTER_HOST_FILE))
  step = methods.get(host['method']).host_step(host['settings'])

  def call(images):
    arrays = dict(zip(host['first_outputs'], first.run(host['first_outputs'],
                                                       {'images': images})))
    feed = {'images': images, **arrays, **step(images, arrays)}
    return tuple(second.run(['maps', 'scores'], feed))

  return call


def _onnx_session(path: str) -> Any:
  """An ONNX Runtime session of `path`, whose package is an optional extra."""
  try:
    import onnxruntime  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(f'{path} needs ONNX Runtime: pip install \'.[onnx]\' (or '
                      f'onnxruntime) ({error})') from error
  return onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])


def images_of(images: Any) -> list[np.ndarray]:
  """The images of `Detector.predict`'s argument, by its input contract.

  A list or tuple, or a 4-D array, is a batch; a 3-D array whose last axis
  is 1, 3 or 4 is one image; a 2-D array is one gray image.

  Raises:
    ValueError: naming the shape, for an empty batch or any other shape.
  """
  if isinstance(images, (list, tuple)):
    batch = list(images)
  else:
    array = np.asarray(images)
    if array.ndim == 4:
      batch = list(array)
    elif array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 3, 4)):
      batch = [array]
    else:
      raise ValueError(
          f'cannot read an array of shape {array.shape} as images: give a batch (N, H, W, C), '
          'a list of images, one image (H, W, 1|3|4) or one gray image (H, W)')
  if not batch:
    raise ValueError('no images to predict: the batch is empty')
  return batch


def to_model_input(image: Any, size: int) -> np.ndarray:
  """uint8 (size, size, 3) of one (H, W) or (H, W, 1|3|4) image.

  Values are read by dtype: uint8 is 0..255; float must lie in [0, 1];
  other integer types span 0..their dtype's largest value (uint16 /65535: a
  12-bit image kept in uint16 reads dark unless divided by 4095 first).
  Grey becomes RGB and alpha is dropped; resizing is PIL bilinear, as for
  files (data.read_rgb).

  Raises:
    ValueError: naming what is wrong: a nested list instead of an array, the
      shape, a dtype that is not a number, or values outside the range.
  """
  if isinstance(image, (list, tuple)):
    raise ValueError('an image must be an array, not a nested list: use np.asarray with '
                     'dtype uint8 (0..255) or float32 (0..1)')
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f'an image must be (H, W) or (H, W, 1|3|4), got shape {image.shape}')
  if image.dtype != np.uint8:
    image = np.rint(_unit_values(image) * 255.0).astype(np.uint8)
  image = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
  if image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
  return image


def _unit_values(image: np.ndarray) -> np.ndarray:
  """Float32 in [0, 1] of a non-uint8 image (see `to_model_input`)."""
  if np.issubdtype(image.dtype, np.integer):
    return data.integers_to_unit(image)
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f'an image must hold numbers (uint8, other integers or float in [0, 1]), '
                     f'got dtype {image.dtype}')
  if np.isnan(image).any():
    raise ValueError('a float image must lie in [0, 1], but it holds NaN')
  low, high = float(image.min()), float(image.max())
  if low < 0 or high > 1:
    raise ValueError(
        f'a float image must lie in [0, 1], but its values span [{low:g}, {high:g}]; '
        'divide 8-bit values by 255 (or pass them as uint8)')
  return image.astype(np.float32)


def resize_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear float resize, so thresholds mean the same at every size."""
  image = Image.fromarray(np.asarray(anomaly_map, dtype=np.float32))
  return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


@dataclasses.dataclass(frozen=True)
class Prediction:
  """The detector's answer for N images, each at the size it was given.

  Attributes:
    maps: float32 (H_i, W_i) anomaly map of each image.
    scores: (N,) image scores.
    anomalous: (N,) bool, scores >= the image threshold.
    masks: bool (H_i, W_i) of each image, map >= the pixel threshold.
  """
  maps: list[np.ndarray]
  scores: np.ndarray
  anomalous: np.ndarray
  masks: list[np.ndarray]


class DamagedExport(ValueError):
  """An export file that cannot be read; the message names it and how to write it again."""

  def __init__(self, path: str, error: Exception):
    super().__init__(
        f'the export file {path} cannot be read ({type(error).__name__}: {error}); it is '
        'damaged or incomplete: write the export again with '
        'python main.py --mode=export --workdir=<the trained run> --config=<its config>')


class Detector:
  """A trained detector: maps, scores and decisions for images of any size."""

  def __init__(self, detect: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
               info: dict[str, Any]):
    """Use `Detector.load`.

    Args:
      detect: uint8 (N, S, S, 3) images -> float32 (N, S, S) final maps and (N,) scores.
      info: the export's JSON (input size, thresholds, ...).
    """
    self._detect = detect
    self.info = info

  @classmethod
  def load(cls, path: str) -> 'Detector':
    """The detector of a workdir, or of an export folder (or its detector.jax).

    An export needs JAX alone; a workdir uses its saved config, its
    checkpoints (stage 2 with the stage 1 it was trained on) and its
    decision thresholds, computing them if missing.

    Raises:
      FileNotFoundError: naming `path`, if it is neither.
    """
    if os.path.isfile(path):
      path = os.path.dirname(os.path.abspath(path))
    if any(os.path.isfile(os.path.join(path, name)) for name in _PROGRAM_FILES.values()):
      return cls._from_export(path)
    config = methods.trained_config(path)
    if config is None:
      raise FileNotFoundError(
          f'{path} is neither a trained workdir (no config.json or checkpoints) nor an '
          f'export folder (no {EXPORT_FILE})')
    return cls.from_run(config, path)

  @classmethod
  def from_run(cls, config: ml_collections.ConfigDict, workdir: str) -> 'Detector':
    """The detector of `workdir`'s checkpoints under `config` (the run's, with overrides).

    Its maps are the engine's (`engine.maps_and_scores`) with the method's
    device-side steps (`Method.pure_config`), and its thresholds are
    calibrated on them.
    """
    model = engine.load_model(config, workdir)
    config = model.method.pure_config(config)
    thresholds = calibration.ensure_thresholds(config, workdir, model)
    info = {
        'input_size': config.image_size, 'method': model.method.name, 'map': model.final_map,
        'thresholds': {'image': thresholds['image'], 'pixel': thresholds['pixel']},
        'steps': model.steps, _BATCH_SIZE_KEY: config.eval.batch_size,
    }
    # Sent to the devices once, not at every call.
    model = dataclasses.replace(model, variables=jax.device_put(
        model.variables, parallel.replicated(engine.local_mesh())))

    def detect(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
      maps, scores = engine.maps_and_scores(config, model, images)
      return maps[model.final_map], scores[model.final_map]

    return cls(detect, info)

  @classmethod
  def _from_export(cls, folder: str) -> 'Detector':
    """The detector of an export folder, StableHLO or ONNX (detector.json's format).

    Raises:
      DamagedExport: naming the file, if either file cannot be read.
    """
    info_path = os.path.join(folder, INFO_FILE)
    try:
      with open(info_path, encoding='utf-8') as f:
        info = json.load(f)
      missing = [key for key in _INFO_KEYS if key not in info]
      if missing:
        raise ValueError(f'it lacks {", ".join(missing)}')
    except (OSError, ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
      raise DamagedExport(info_path, error) from error
    program = os.path.join(folder, _PROGRAM_FILES.get(info.get('format'), EXPORT_FILE))
    try:
      if program.endswith(ONNX_FILE):
        call = _onnx_call(folder, info)
      else:
        with open(program, 'rb') as f:
          call = jax.export.deserialize(bytearray(f.read())).call
    except ImportError:
      raise
    except Exception as error:  # pylint: disable=broad-exception-caught
      # A truncated or foreign file fails deep in the deserializer, with any type.
      raise DamagedExport(program, error) from error
    # A StableHLO program compiles once per batch shape: pad to one. ONNX
    # Runtime takes any batch as it is.
    return cls(functools.partial(_in_batches, call, info[_BATCH_SIZE_KEY],
                                 not program.endswith(ONNX_FILE)), info)

  def detect(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 maps (N, S, S) and scores (N,) of uint8 images (N, S, S, 3) at the input size."""
    size = self.info['input_size']
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
      raise ValueError(f'images must be uint8 (N, {size}, {size}, 3), got '
                       f'{images.dtype} {images.shape}')
    return self._detect(images)

  def predict(self, images: Sequence[np.ndarray] | np.ndarray) -> Prediction:
    """Maps at each image's own size, scores and decisions at the stored thresholds.

    Args:
      images: a batch, as a list of images or one (N, H, W, C) array; or one
        image, (H, W, 1|3|4), or one gray image, (H, W). Any sizes. uint8 is
        0..255, float must lie in [0, 1] (anything beyond, or NaN, is
        refused), other integer types span 0..their dtype's largest value
        (uint16: /65535; scale a 12-bit image kept in uint16 by 1/4095
        yourself).

    Raises:
      ValueError: naming the problem, for an empty batch, another shape, a
        nested list as an image or values outside their dtype's range.
    """
    images = images_of(images)
    size = self.info['input_size']
    maps, scores = self.detect(np.stack([to_model_input(image, size) for image in images]))
    thresholds = self.info['thresholds']
    sized = [resize_map(m, *np.asarray(image).shape[:2]) for m, image in zip(maps, images)]
    return Prediction(maps=sized, scores=scores, anomalous=scores >= thresholds['image'],
                      masks=[m >= thresholds['pixel'] for m in sized])


def _in_batches(call: DetectFn, batch: int, pad: bool, images: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
  """`call` on `images` in batches of at most `batch`; with `pad`, the last padded to `batch`."""
  maps, scores = [], []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    padded = (np.concatenate([chunk, np.zeros((batch - len(chunk),) + chunk.shape[1:], np.uint8)])
              if pad else chunk)
    chunk_maps, chunk_scores = call(padded)
    maps.append(np.asarray(chunk_maps)[:len(chunk)])
    scores.append(np.asarray(chunk_scores)[:len(chunk)])
  return np.concatenate(maps), np.concatenate(scores)
