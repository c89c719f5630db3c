"""What every method's config shares: data, training loop, evaluation, machinery.

A method's config starts from `get_config()` and adds the sections of its own
(configs/mvtec.py, configs/bauer.py, configs/anoseg.py, configs/utad.py);
`patch_distortion()` is the section two methods share.
"""

import ml_collections


def get_config(num_stages: int) -> ml_collections.ConfigDict:
  """The shared sections of a method of `num_stages` stages.

  `method` and the method's own sections are the caller's.
  """
  config = ml_collections.ConfigDict()
  config.method = ''  # set by the method's config
  config.seed = 0
  # Which stages --mode=train trains: 'both' (all of the method's, in order) or
  # one stage's number ('2' alone needs the earlier stages' checkpoints in the workdir).
  config.stage = 'both'

  # Data: an MVTec-AD-layout folder; '' selects the built-in demo dataset.
  config.data_dir = ''
  config.category = 'bottle'
  config.image_size = 256
  # Where derived data is cached (demo dataset, tfds cache of the categories,
  # SLIC labels of the sources); '' means ~/.cache/twostage_jax.
  config.cache_dir = ''
  # 'tfds': the first run writes the category's resized images and masks to
  # <cache_dir>/tfds/ (tensorflow-datasets, array_record files) and later
  # runs read them from there; 'none': decode the image files on every run.
  config.data_cache = 'tfds'

  config.demo = ml_collections.ConfigDict()
  config.demo.seed = 0
  config.demo.image_size = 128  # size the demo PNGs are written at
  config.demo.num_train = 80
  config.demo.num_test_good = 20
  config.demo.num_test_per_defect = 8

  # Geometric augmentation of the normal images before synthesis: a rotation
  # drawn from `rotations`, then flips with probability 0.5 each. The
  # papers use none; `augment_by_category` overrides it per category.
  config.augment = ml_collections.ConfigDict()
  config.augment.rotations = (0,)
  config.augment.hflip = False
  config.augment.vflip = False
  config.augment_by_category = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  # Mixed precision: 'bfloat16' computes in bfloat16 with float32 parameters
  # and optimizer state; 'auto' = bfloat16 on GPU/TPU, float32 on CPU.
  config.model.compute_dtype = 'auto'

  config.train = ml_collections.ConfigDict()
  config.train.global_batch_size = 8
  config.train.num_steps = 20000
  config.train.learning_rate = 1e-4
  config.train.lr_decay_fractions = (0.8, 0.9)
  config.train.lr_decay_factor = 0.2
  config.train.num_workers = 4  # host processes synthesising batches
  config.train.prefetch_batches = 8  # batches built ahead of the device
  config.train.device_prefetch = 2  # of those, already sent to the devices
  config.train.log_every = 50
  config.train.checkpoint_every = 1000
  config.train.keep_checkpoints = 3
  # TensorBoard logs in <workdir>/tensorboard/stage<n>/ (twostage_jax/training/summaries.py):
  # the metrics.jsonl scalars, and with tensorboard_images > 0 that many
  # pseudo-anomaly samples at the start and held-out maps at each checkpoint.
  config.train.tensorboard = True
  config.train.tensorboard_images = 4

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 16
  # Image score: 'mean_filter_max' (max of the score_filter_size mean-filtered
  # map, the papers' rule) or 'max' (the map's maximum).
  config.eval.score_rule = 'mean_filter_max'
  config.eval.score_filter_size = 21
  # Gaussian smoothing (sigma in pixels at image_size) of every reported
  # map; 0, the papers' choice, reports the networks' maps as they are.
  config.eval.map_sigma = 0.0
  # eval.stage<n>_step: the checkpoint step of each stage to evaluate; -1 =
  # the newest (for an earlier stage: the one the later stage was trained on).
  for stage in range(1, num_stages + 1):
    config.eval[f'stage{stage}_step'] = -1
  config.eval.num_examples = 6  # worst and best test images drawn in the report

  # Decision thresholds for --mode=predict, fixed after training from normal
  # training images held out of training (never from the test set): the
  # image threshold is this quantile of their image scores, the pixel
  # threshold this quantile of their final-map pixels.
  config.calibration = ml_collections.ConfigDict()
  config.calibration.holdout_fraction = 0.1  # of train/good
  config.calibration.image_quantile = 0.99
  config.calibration.pixel_quantile = 0.999

  # --mode=predict: folder of images to score, and where the heatmaps, masks
  # and scores.csv go ('' = <workdir>/predictions).
  config.predict_dir = ''
  config.predict_output_dir = ''

  # --mode=export: 'stablehlo' writes export/detector.jax (jax.export, which JAX
  # alone runs), lowered for `platforms` (any subset of 'cpu', 'cuda', 'rocm',
  # 'tpu'); 'onnx' writes export/detector.onnx for ONNX Runtime and others
  # (the onnx extra: pip install '.[onnx]'; docs/deploy.md).
  config.export = ml_collections.ConfigDict()
  config.export.format = 'stablehlo'
  config.export.platforms = ('cpu', 'cuda', 'tpu')

  # XLA compiler options for the CPU backend, e.g. {'xla_cpu_experimental_ynn_fusion_type':
  # 'LIBRARY_FUSION_TYPE_REDUCE'} (configs/mvtec_cpu.py); an option the
  # installed jaxlib does not know is dropped with a warning.
  config.xla_cpu_options = ml_collections.ConfigDict()

  # Multi-host: call jax.distributed.initialize() before anything touches
  # the devices. Empty/negative values are left to JAX's cluster detection
  # (SLURM, Open MPI, TPU pods, Kubernetes; JAX_COORDINATOR_ADDRESS).
  config.distributed = ml_collections.ConfigDict()
  config.distributed.enabled = False
  config.distributed.coordinator_address = ''
  config.distributed.num_processes = -1
  config.distributed.process_id = -1
  return config


def patch_distortion() -> ml_collections.ConfigDict:
  """Bauer's patch distortion, also a pseudo-anomaly of the two-stage model.

  A random patch, elastically deformed under a random blob-shaped mask
  (twostage_jax/synthesis/distortion.py).
  """
  distortion = ml_collections.ConfigDict()
  distortion.p_distort = 1.0  # used when the generator is picked
  distortion.patch_min_fraction = 0.1  # patch side / image side
  distortion.patch_max_fraction = 0.5
  distortion.elastic_alpha = 8.0  # largest displacement, pixels
  distortion.elastic_sigma = 4.0  # smoothing of the field, pixels
  distortion.shape_sigma = 0.1  # blob smoothing, share of the patch side
  distortion.shape_threshold = 0.5  # in [0, 1): larger, smaller blobs
  distortion.brightness_max = 0.0  # patch brightness x U(1 -/+ this)
  return distortion
