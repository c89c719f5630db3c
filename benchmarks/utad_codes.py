"""What a trained UTAD IE-Net's codes carry: their means' spread against the posterior's noise.

Prints, over 32 training images of the run, the median posterior variance
sigma^2 of IE-Net's codes and the variance of the code means across images
and across positions. The statistics network T judges sampled codes
z = mu + sigma * eps: when sigma^2 is near the prior's 1 and the means
barely vary, an image's own code is indistinguishable from another's and the
information bound cannot leave chance (docs/results.md, issue 30).

  python benchmarks/utad_codes.py WORKDIR
"""

import argparse

import jax.numpy as jnp
import numpy as np

from twostage_jax import data
from twostage_jax import methods
from twostage_jax.inference import engine


def main(workdir: str) -> None:
  config = methods.trained_config(workdir)
  if config is None or config.method != 'utad':
    raise SystemExit(f'{workdir} is not a trained UTAD workdir')
  model = engine.load_model(config, workdir)
  ie_net = model.method.create_model(config, 1)
  images, _ = data.training_images(config)
  batch = jnp.asarray(images[:32].astype(np.float32) / 255.0)
  out = ie_net.apply(model.variables[0], batch, train=False)
  mean, variance = np.asarray(out['mean']), np.exp(np.asarray(out['log_variance']))
  print(f'{workdir} (stage-1 step {model.stage_steps[0]}, {len(batch)} training images)')
  print(f'  posterior variance sigma^2: median {np.median(variance):.4f}')
  print(f'  code means: variance across images {np.var(mean, axis=0).mean():.4f}, '
        f'across positions {np.var(mean, axis=(1, 2)).mean():.4f}')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('workdir')
  main(parser.parse_args().workdir)
