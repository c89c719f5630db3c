"""AnoSeg on one MVTec AD category within about 15 minutes on a 2-core CPU.

The networks of Table 6 at a quarter of their widths and 64x64 images (the
two-stage CPU recipe's size), Adam at 1e-3 for the steps a CPU allows. The
ResNet trained from scratch needs them: on the demo's weave the map alone
(`--config.loss.adversarial=False`) was at the trivial all-normal loss after
300 steps and learned from about 700 on (pixel AUROC 0.98 after 1,500). The
full model, which also trains the image decoder and the discriminator, stayed
near the trivial map at this budget (pixel AUROC 0.75 on the weave):
docs/results.md has every run, its command and its figures. Issue 29 traced
it to the adversarial term acting on the map; the named option
`--config.loss.image_branch_from_step=750 --config.loss.adversarial_weight=0.001`
(a warm start and a lighter adversarial term, where the paper is silent)
stayed within 0.01 of the map alone on bottle with seeds 0 and 1, but not on
the weave (-0.014 with seed 0, -0.35 with seed 1): short of the adoption rule
written there.

  python main.py --config=configs/anoseg_cpu.py --workdir=runs/anoseg_bottle_cpu \
      --config.data_dir=/data/mvtec_ad --config.category=bottle

On the built-in demo data: --config.category=weave and no data_dir.
"""

import ml_collections

from configs import anoseg


def get_config() -> ml_collections.ConfigDict:
  config = anoseg.get_config()
  config.image_size = 64
  config.model.encoder_widths = (16, 32, 64, 128)
  config.model.decoder_widths = (128, 64, 32, 32, 32, 32)
  config.model.discriminator_widths = (16, 32, 64, 128, 32)  # 64x64 down to 2x2
  config.train.global_batch_size = 8
  config.train.num_steps = 1500
  config.train.learning_rate = 1e-3
  config.stage2.num_steps = 300
  # One worker keeps up with a step at 64x64; the second core runs the step.
  config.train.num_workers = 1
  config.train.log_every = 50
  config.train.checkpoint_every = 500
  config.eval.batch_size = 32
  config.eval.map_sigma = 4.0  # as in configs/mvtec_cpu.py
  config.xla_cpu_options.xla_cpu_experimental_ynn_fusion_type = 'LIBRARY_FUSION_TYPE_REDUCE'
  return config
