"""Prediction on a folder of new images: heatmaps, masks and scores.csv.

A thin user of the compiled detector (detector.py): the model's final map
decides, with the thresholds calibrated on held-out normal training images
(calibration.py): an image is anomalous when its
score reaches the image threshold, a pixel when its map value reaches the
pixel threshold. Outputs are written at each file's original size, so a
user can lay a mask over the photo they supplied without knowing the
model's input size.

Image files that cannot be decoded are skipped, not fatal: each still gets
a row in scores.csv, with an empty score and the decision 'unreadable'.
The output folder is checked before any inference, so a wrong or
read-only folder costs seconds, not a whole run.
"""

import collections
import csv
import io
import os
import tempfile
from typing import Sequence

import jax
import matplotlib
import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from twostage_jax import data
from twostage_jax.inference import detector
from twostage_jax.workdir import atomic_write
from twostage_jax.workdir import paths

SCORES_FILE = 'scores.csv'
# scores.csv decision of an image file that could not be decoded.
UNREADABLE = 'unreadable'

_COLORMAP = 'jet'
_HEATMAP_WEIGHT = 0.5


def _check_inputs(paths: list[str], original_sizes: np.ndarray,
                  images: np.ndarray, maps: np.ndarray, scores: np.ndarray,
                  pixel_threshold: float) -> None:
  """Fails before anything is written, so no half-written folder is left."""
  if not pixel_threshold > 0:
    raise ValueError(f'pixel_threshold must be > 0, got {pixel_threshold}: '
                     'heatmaps are scaled by it')
  if scores.ndim != 1:
    raise ValueError(f'scores must be (N,), got shape {scores.shape}')
  lengths = {'paths': len(paths), 'original_sizes': len(original_sizes),
             'images': len(images), 'maps': len(maps), 'scores': len(scores)}
  if len(set(lengths.values())) > 1:
    listed = ', '.join(f'{name} {n}' for name, n in lengths.items())
    raise ValueError(f'one entry per image expected; lengths differ: {listed}')
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError('images must be uint8 (N, H, W, 3), got '
                     f'{images.dtype} {images.shape}')
  if maps.ndim != 3:
    raise ValueError(f'maps must be (N, H, W), got shape {maps.shape}')
  if original_sizes.shape != (len(paths), 2):
    raise ValueError('original_sizes must be (N, 2) (height, width), got '
                     f'shape {original_sizes.shape}')


def _output_stems(paths: list[str]) -> list[str]:
  """File stems, with the extension kept where stems clash (a.png, a.jpg)."""
  split = [os.path.splitext(os.path.basename(path)) for path in paths]
  counts = collections.Counter(stem for stem, _ in split)
  stems = [stem if counts[stem] == 1 else f'{stem}_{extension[1:]}'
           for stem, extension in split]
  clashes = sorted(s for s, n in collections.Counter(stems).items() if n > 1)
  if clashes:
    raise ValueError("input files would overwrite each other's outputs: "
                     f'{", ".join(clashes)}')
  return stems


def _heatmap(image: np.ndarray, anomaly_map: np.ndarray,
             pixel_threshold: float) -> np.ndarray:
  """uint8 RGB: the coloured map blended over the image.

  The map is scaled so the pixel threshold sits mid-colormap: blue is
  clearly normal, red clearly anomalous, whatever the model's score range.
  """
  scaled = np.clip(anomaly_map / (2.0 * pixel_threshold), 0.0, 1.0)
  colours = matplotlib.colormaps[_COLORMAP](scaled, bytes=True)[..., :3]
  blended = ((1.0 - _HEATMAP_WEIGHT) * image.astype(np.float32) +
             _HEATMAP_WEIGHT * colours.astype(np.float32))
  return np.rint(blended).astype(np.uint8)


def write_predictions(output_dir: str, paths: list[str],
                      original_sizes: np.ndarray, images: np.ndarray,
                      maps: np.ndarray, scores: np.ndarray,
                      image_threshold: float, pixel_threshold: float,
                      unreadable: Sequence[str] = ()) -> list[str]:
  """Writes a heatmap and a mask per image, and scores.csv, to output_dir.

  For each input `<stem>.<ext>`, `<stem>_heatmap.png` (RGB) and
  `<stem>_mask.png` (0/255 grayscale, 255 where map >= pixel_threshold) are
  written at the file's original size; where two inputs share a stem, the
  extension is kept in the name (`a_png_heatmap.png`). The heatmap's
  background is `images` resized back, not the file re-read, so it shows
  exactly what the model saw.

  Args:
    output_dir: created if missing; existing files of the same names are
      replaced.
    paths: the input files, one per image; only their names are used.
    original_sizes: int (N, 2), (height, width) of each input file.
    images: uint8 (N, H, W, 3), the model's inputs.
    maps: float (N, H', W'), anomaly maps.
    scores: (N,) image scores.
    image_threshold: scores >= this are reported 'anomalous'.
    pixel_threshold: map values >= this are anomalous in the masks; must be
      > 0.
    unreadable: input files that could not be decoded; each gets a row in
      scores.csv after the scored ones, with an empty score and the decision
      'unreadable', so the table accounts for every file.

  Returns:
    The written files: heatmap and mask of each image, then scores.csv.

  Raises:
    ValueError: pixel_threshold <= 0, inputs of different lengths or shapes,
      or two inputs that would get the same output names.
  """
  images, maps = np.asarray(images), np.asarray(maps)
  original_sizes, scores = np.asarray(original_sizes), np.asarray(scores)
  _check_inputs(paths, original_sizes, images, maps, scores, pixel_threshold)
  stems = _output_stems(paths)
  os.makedirs(output_dir, exist_ok=True)

  written = []
  for stem, (height, width), image, anomaly_map in zip(
      stems, original_sizes.tolist(), images, maps):
    resized_map = detector.resize_map(anomaly_map, height, width)
    resized_image = np.asarray(Image.fromarray(image).resize(
        (width, height), Image.Resampling.BILINEAR))
    heatmap_path = os.path.join(output_dir, f'{stem}_heatmap.png')
    Image.fromarray(_heatmap(resized_image, resized_map,
                             pixel_threshold)).save(heatmap_path)
    mask = np.where(resized_map >= pixel_threshold, 255, 0).astype(np.uint8)
    mask_path = os.path.join(output_dir, f'{stem}_mask.png')
    Image.fromarray(mask).save(mask_path)
    written += [heatmap_path, mask_path]

  table = io.StringIO()
  writer = csv.writer(table, lineterminator='\n')
  writer.writerow(['file', 'image_score', 'decision'])
  for path, score in zip(paths, scores.tolist()):
    decision = 'anomalous' if score >= image_threshold else 'normal'
    writer.writerow([os.path.basename(path), f'{score:.6g}', decision])
  for path in unreadable:
    writer.writerow([os.path.basename(path), '', UNREADABLE])
  scores_path = os.path.join(output_dir, SCORES_FILE)
  atomic_write.write_text(scores_path, table.getvalue())
  written.append(scores_path)
  return written


def check_output_dir(predict_dir: str, output_dir: str) -> None:
  """Refuses an output folder that is, or lies inside, the image folder.

  Outputs written there would mix with the user's images, and with the
  output folder equal to the image folder every rerun would score the
  previous run's heatmaps and masks. Real paths are compared, so symlinks,
  `..` and trailing slashes cannot hide the overlap.

  Raises:
    DatasetError: naming both folders.
  """
  images_real = os.path.realpath(predict_dir)
  output_real = os.path.realpath(output_dir)
  if output_real == images_real:
    where = 'is the image folder'
  elif os.path.commonpath([images_real, output_real]) == images_real:
    where = 'is inside the image folder'
  else:
    return
  raise data.DatasetError(
      f'output folder {output_dir} {where} {predict_dir}: outputs would mix '
      'with the images to score; set --config.predict_output_dir to a folder '
      'outside it')


def check_writable(output_dir: str) -> None:
  """Creates `output_dir` and a temporary file in it, to fail before inference.

  Raises:
    DatasetError: naming the folder, if either cannot be created.
  """
  try:
    os.makedirs(output_dir, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=output_dir, prefix='.write-check-'):
      pass
  except OSError as error:
    raise data.DatasetError(
        f'cannot write predictions to output folder {output_dir}: '
        f'{error.strerror or error}') from error


def predict(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Scores every image of `config.predict_dir` with the run in `workdir`.

  Returns:
    The output folder: `config.predict_output_dir`, or `<workdir>/predictions`.

  Raises:
    ValueError: if `config.predict_dir` is not set.
    DatasetError: for a missing folder, a folder without readable images, or
      an output folder that overlaps the image folder or cannot be written.
    FileNotFoundError: naming the workdir, if it holds no checkpoint.
  """
  if not config.predict_dir:
    raise ValueError('--mode=predict needs --config.predict_dir=<folder of images>')
  output_dir = config.predict_output_dir or paths.predictions_dir(workdir)
  check_output_dir(config.predict_dir, output_dir)
  folder = data.load_image_folder(config.predict_dir, config.image_size)
  if jax.process_index() == 0:
    check_writable(output_dir)
  model = detector.Detector.from_run(config, workdir)
  maps, scores = model.detect(folder.images)
  thresholds = model.info['thresholds']
  if jax.process_index() == 0:
    write_predictions(output_dir, folder.paths, folder.original_sizes, folder.images,
                      maps, scores, thresholds['image'], thresholds['pixel'],
                      unreadable=list(folder.unreadable))
  flagged = int((scores >= thresholds['image']).sum())
  logging.info('predicted %d images (%d anomalous at image threshold %.4g, %d unreadable); '
               'wrote %s', len(folder.paths), flagged, thresholds['image'],
               len(folder.unreadable), output_dir)
  return output_dir
