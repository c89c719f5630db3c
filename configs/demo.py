"""Built-in demo: procedurally generated data and a CPU-sized model.

Both stages + evaluation take about 4 minutes on a 2-core CPU:
  python main.py --config=configs/demo.py --workdir=runs/demo
"""

import ml_collections

from configs import mvtec


def get_config() -> ml_collections.ConfigDict:
  config = mvtec.get_config()
  config.data_dir = ''
  config.category = 'weave'
  config.image_size = 64
  config.model.width = 8
  config.train.num_steps = 1200
  config.train.learning_rate = 1e-3
  # At 64x64 one worker outpaces the step; the second core runs the step.
  config.train.num_workers = 1
  config.train.log_every = 100
  config.train.checkpoint_every = 500
  config.eval.batch_size = 32
  # YNNPACK for XLA:CPU's reductions only (the convolutions stay with Eigen):
  # 1.6x faster steps here (benchmarks/train_step.py --xla-option); dropped
  # with a warning where the installed jaxlib lacks the option.
  config.xla_cpu_options.xla_cpu_experimental_ynn_fusion_type = 'LIBRARY_FUSION_TYPE_REDUCE'
  # scikit-image's SLIC in host workers: on a CPU the device version is slower
  # (0.8 s against 0.05 s per 256x256 image on 2 cores, benchmarks/superpixels.py).
  config.refine.superpixels = 'host'
  return config
