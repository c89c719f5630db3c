"""Trains, evaluates and applies the anomaly segmentation models.

The two-stage model (configs/mvtec.py, configs/demo.py), Bauer's
autoencoder (configs/bauer.py), AnoSeg (configs/anoseg.py) or UTAD
(configs/utad.py), through the same modes:

  python main.py --config=configs/demo.py --workdir=runs/demo
  python main.py --config=configs/mvtec.py --workdir=runs/bottle \
      --config.data_dir=/data/mvtec_ad --config.category=bottle
  python main.py --config=configs/mvtec.py --workdir=runs/bottle --mode=evaluate
  python main.py --config=configs/mvtec.py --workdir=runs/bottle --mode=predict \
      --config.predict_dir=/data/new_images
  python main.py --config=configs/mvtec.py --workdir=runs/mvtec \
      --config.data_dir=/data/mvtec_ad --config.category=all
  python main.py --config=configs/bauer.py --workdir=runs/bauer_grid \
      --config.data_dir=/data/mvtec_ad --config.category=grid

Running the same training command again resumes where it stopped. A workdir
keeps the config it was trained with (`config.json`): later commands on it use
that config, and refuse a `--config.key=value` that would change what was
learned (docs/workdir.md lists the settings that may change).

The program is in twostage_jax/cli.py: the input pipeline's workers are
spawned processes that re-import this file, and nothing here imports JAX.
"""

if __name__ == '__main__':
  from twostage_jax import cli
  cli.run()
