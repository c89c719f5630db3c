"""UTAD on one MVTec AD category within about 12 minutes on a 2-core CPU.

configs/utad.py's networks at a quarter of their widths and 64x64 images
(the other CPU recipes' size), the paper's batch of 4 and optimizers (SGD
and Adam from 1e-3). IE-Net trains 4,000 steps, about the paper's 200 epochs
of the demo's 72 training images; Expert-Net, about 4x slower a step, 1,500.
docs/results.md has the runs and their figures.

  python main.py --config=configs/utad_cpu.py --workdir=runs/utad_bottle_cpu \
      --config.data_dir=/data/mvtec_ad --config.category=bottle

On the built-in demo data: --config.category=weave and no data_dir.
"""

import ml_collections

from configs import utad


def get_config() -> ml_collections.ConfigDict:
  config = utad.get_config()
  config.image_size = 64
  config.ie_net.encoder_widths = (16, 32, 64, 128)
  config.ie_net.decoder_widths = (64, 32, 16, 8)
  config.ie_net.latent_dim = 16
  config.ie_net.mlp_width = 128
  config.ie_net.statistics_width = 128
  config.expert.encoder_widths = (16, 32, 64, 64)
  config.expert.detail_widths = (16, 32)
  config.expert.mlp_width = 64
  config.train.num_steps = 4000
  config.stage2.num_steps = 1500
  # One worker keeps up with a step at 64x64; the second core runs the step.
  config.train.num_workers = 1
  config.train.log_every = 100
  config.train.checkpoint_every = 1000
  config.eval.batch_size = 32
  config.eval.map_sigma = 4.0  # as in configs/mvtec_cpu.py
  config.xla_cpu_options.xla_cpu_experimental_ynn_fusion_type = 'LIBRARY_FUSION_TYPE_REDUCE'
  return config
