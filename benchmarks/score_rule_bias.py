"""Position bias of image-score rules, on synthetic blobs and on held-out normal images.

Part 1 (no model): a square blob on a constant background, at every position
where it fits, through the map smoothing (reflected, and the zero-padded one
it replaced) and each rule. For each rule it prints r = (score - background
score) / (score of the centred blob - background score) over positions; a
rule without a position prior gives r = 1 everywhere.

Part 2 (with trained two-stage runs, optional): pseudo-anomalies of the
run's own synthesis (`synthesis`, its anomaly sources) pasted into the
held-out normal training images (never test images), the run's final maps,
and each rule's image AUROC against the unchanged held-out images: all, and
split by whether the mask's centre lies within half a window of the border.

Rules: the papers' 'mean_filter_max' (21 x 21 window, zeros outside), the
same window normalised by the pixels inside the image, the papers' rule
with the window scaled to the image size (21 x S / 256, odd), and 'max'.

  python benchmarks/score_rule_bias.py [--skip-blobs] [WORKDIR ...]
"""

import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from twostage_jax import data
from twostage_jax import losses
from twostage_jax import methods
from twostage_jax.evaluation import metrics
from twostage_jax.inference import engine
from twostage_jax.methods.two_stage import method as two_stage
from twostage_jax.synthesis import distortion
from twostage_jax.synthesis import pseudo_anomaly

PAPER_SIZE, PAPER_WINDOW = 256, 21  # the papers' window at their image size
BACKGROUND, HEIGHT = 0.1, 0.5
VERSIONS = 8  # pseudo-anomalous versions of each held-out image


def scaled_window(size: int) -> int:
  """The papers' window scaled to `size` (odd, at least 1)."""
  return max(1, 2 * int(round(PAPER_WINDOW * size / PAPER_SIZE / 2 - 0.5)) + 1)


def mean_filter_max_inside(maps: jax.Array, size: int) -> jax.Array:
  """Max of the size x size mean over the pixels of each window inside the image."""
  summed = jax.lax.reduce_window(maps, 0.0, jax.lax.add, (1, size, size), (1, 1, 1), 'SAME')
  rows, columns = (np.convolve(np.ones(n), np.ones(size), 'same') for n in maps.shape[1:])
  return (summed / np.outer(rows, columns).astype(np.float32)).max(axis=(1, 2))


def rules(image_size: int) -> dict[str, Callable[[jax.Array], jax.Array]]:
  scaled = scaled_window(image_size)
  return {
      f'papers ({PAPER_WINDOW}, zeros outside)':
          lambda m: engine.mean_filter_max(m, PAPER_WINDOW),
      f'normalised inside ({PAPER_WINDOW})': lambda m: mean_filter_max_inside(m, PAPER_WINDOW),
      f'papers, scaled ({scaled})': lambda m: engine.mean_filter_max(m, scaled),
      'max': lambda m: m.max(axis=(1, 2)),
  }


def zero_padded_smooth(maps: jax.Array, sigma: float) -> jax.Array:
  """The map smoothing before this measurement: zeros outside the map."""
  if sigma == 0:
    return maps
  window = 2 * int(np.ceil(3 * sigma)) + 1
  return losses.gaussian_filter_same(window, sigma)(maps[..., None])[..., 0]


def blob_maps(size: int, side: int, stride: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """Maps with one side x side blob, at every stride-th position where it fits."""
  corners = range(0, size - side + 1, stride)
  positions = [(top, left) for top in corners for left in corners]
  maps = np.full((len(positions), size, size), BACKGROUND, np.float32)
  for m, (top, left) in zip(maps, positions):
    m[top:top + side, left:left + side] += HEIGHT
  return maps, positions


def blob_bias(size: int, stride: int) -> None:
  """Prints min and max r over positions for each rule, blob side and smoothing."""
  sigma = 4.0 * size / 64  # the CPU recipes' sigma 4 at 64 x 64, scaled
  smoothings = {'σ 0': lambda m: m,
                f'σ {sigma:g} reflected': lambda m: engine.smooth(m, sigma),
                f'σ {sigma:g} zeros (before)': lambda m: zero_padded_smooth(m, sigma)}
  print(f'\n{size}x{size}: r = (score - background) / (centred blob - background)\n')
  print('| blob side | smoothing | rule | min r | max r | max abs(r - 1) |')
  print('|---|---|---|---|---|---|')
  for side in (max(3, size // 21), max(9, size // 7)):
    maps, positions = blob_maps(size, side, stride)
    flat = np.full((1, size, size), BACKGROUND, np.float32)
    centre = np.argmin([abs(t - (size - side) / 2) + abs(l - (size - side) / 2)
                        for t, l in positions])
    for smoothing_name, smooth in smoothings.items():
      for rule_name, rule in rules(size).items():
        score = jax.jit(lambda m, smooth=smooth, rule=rule: rule(smooth(m)))
        values = np.concatenate([np.asarray(score(jnp.asarray(maps[i:i + 256])))
                                 for i in range(0, len(maps), 256)]).astype(np.float64)
        background = float(score(jnp.asarray(flat))[0])
        r = (values - background) / (values[centre] - background)
        print(f'| {side} | {smoothing_name} | {rule_name} | {r.min():.4f} | {r.max():.4f} | '
              f'{np.abs(r - 1).max():.4f} |', flush=True)


def held_out_samples(config, images: np.ndarray, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
  """VERSIONS pseudo-anomalous uint8 versions of each image (non-empty masks) and masks."""
  synthesize = pseudo_anomaly.PseudoAnomalySynthesizer(
      two_stage.anomaly_sources(config), config.synthesis,
      distortion.PatchDistorter(config.distortion))
  rng = np.random.default_rng(seed)
  out, masks = [], []
  for image in images:
    made = 0
    while made < VERSIONS:
      sample, mask = synthesize(image.astype(np.float32) / 255, rng)
      if mask.any():
        out.append(np.round(np.clip(sample, 0, 1) * 255).astype(np.uint8))
        masks.append(mask > 0)
        made += 1
  return np.stack(out), np.stack(masks)


def held_out_auroc(workdir: str) -> None:
  """Prints each rule's image AUROC on the run's held-out images with pseudo-anomalies."""
  config = methods.trained_config(workdir)
  model = engine.load_model(config, workdir)
  normal = data.training_images(config)[1]
  anomalous, masks = held_out_samples(config, normal)
  size = config.image_size
  centres = np.array([np.argwhere(m).mean(axis=0) for m in masks])
  near = np.minimum(centres, size - 1 - centres).min(axis=1) < PAPER_WINDOW // 2
  print(f'\n{workdir} ({config.category}, {len(normal)} held-out images, {len(anomalous)} '
        f'pseudo-anomalous of which {near.sum()} centred within {PAPER_WINDOW // 2} px of the '
        f'border)\n')
  print('| σ (reflected) | rule | image AUROC | near the border | farther in |')
  print('|---|---|---|---|---|')
  for sigma in (0.0, config.eval.map_sigma):
    config.eval.map_sigma = sigma
    final = model.final_map
    maps_normal = engine.anomaly_maps(config, model, normal)[final]
    maps_anomalous = engine.anomaly_maps(config, model, anomalous)[final]
    for rule_name, rule in rules(size).items():
      score = jax.jit(rule)
      s_normal = np.asarray(score(jnp.asarray(maps_normal)))
      s_anomalous = np.asarray(score(jnp.asarray(maps_anomalous)))

      def auroc(selected: np.ndarray) -> float:
        scores = np.concatenate([s_normal, s_anomalous[selected]])
        labels = np.concatenate([np.zeros(len(s_normal)), np.ones(selected.sum())])
        return metrics.auroc(scores, labels)

      print(f'| {sigma:g} | {rule_name} | {auroc(np.ones_like(near)):.4f} | '
            f'{auroc(near):.4f} | {auroc(~near):.4f} |', flush=True)


def main(args: list[str]) -> None:
  if '--skip-blobs' not in args:
    blob_bias(64, stride=1)
    blob_bias(256, stride=8)
  for workdir in (a for a in args if a != '--skip-blobs'):
    held_out_auroc(workdir)


if __name__ == '__main__':
  main(sys.argv[1:])
